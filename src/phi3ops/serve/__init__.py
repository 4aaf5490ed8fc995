"""What a registered model is made of and how it answers: its pyfunc, artifacts, `phi3ops chat`."""

"""The base model and what rides on it: loading, tokenizer, chat templates, adapters, generation."""

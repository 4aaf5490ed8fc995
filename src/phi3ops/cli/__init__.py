"""The `phi3ops` command: parse, call one function, print."""

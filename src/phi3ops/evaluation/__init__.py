"""Scoring models on the held-out split with `evaluate` metrics kept in the package."""

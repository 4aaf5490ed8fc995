"""Prefect flows over phi3ops' stages: `retrain` (flows/retrain.py) and its schedule."""

"""The dataset: DVC versions, ingest, validation, preprocessing, drift, demo data."""

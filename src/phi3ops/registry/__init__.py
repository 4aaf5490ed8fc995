"""MLflow: runs, registered versions and their lineage, promotion by alias, trusted loading."""

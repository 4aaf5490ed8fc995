"""The project's Prefect flows (not installed; loaded from the project root): `retrain`
(flows/retrain.py), its steps as tasks (flows/steps.py) and its schedule (flows/schedule.py)."""

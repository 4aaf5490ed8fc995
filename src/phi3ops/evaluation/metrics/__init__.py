"""Offline `evaluate` metric modules, loaded by path so nothing is fetched from the hub.

    evaluate.load(metric_path("rouge"))
"""

from pathlib import Path

METRICS_DIR = Path(__file__).parent


def metric_path(name: str) -> str:
    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        known = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"unknown metric {name!r}; kept in the package: {known}")
    return str(path.parent)

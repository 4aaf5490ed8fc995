"""Import direction: flows/ -> phi3ops -> libraries. Nothing under src/ imports Prefect or flows."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_src_never_imports_prefect_or_flows():
    offenders = {str(p.relative_to(SRC)): sorted(imported_modules(p) & {"prefect", "flows"})
                 for p in SRC.rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_files_stay_readable():
    for path in list(SRC.rglob("*.py")) + list((SRC.parent / "flows").rglob("*.py")):
        assert len(path.read_text().splitlines()) <= 400, path

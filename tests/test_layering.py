"""Import direction: cli -> flows/ -> phi3ops -> libraries. Below the command line nothing under
src/ imports Prefect or flows, and inference (evaluation, serving) imports no training code."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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


FRONT_DOOR = SRC / "phi3ops" / "cli.py"  # `phi3ops run` starts the flow: it sits above flows/


def test_src_never_imports_prefect_or_flows():
    offenders = {str(p.relative_to(SRC)): sorted(imported_modules(p) & {"prefect", "flows"})
                 for p in SRC.rglob("*.py") if p != FRONT_DOOR}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert "prefect" not in imported_modules(FRONT_DOOR)


TRAINING = ("phi3ops.train", "phi3ops.launch", "phi3ops.lm_head")


@pytest.mark.parametrize("module, forbidden", [
    ("phi3ops.inference", TRAINING), ("phi3ops.evaluation", TRAINING),
    ("phi3ops.serving", (*TRAINING, "phi3ops.evaluation", "evaluate")),
    ("phi3ops.chat", ("mlflow", "torch", "transformers"))])  # its two halves start in parallel
def test_inference_imports_no_training_code(module, forbidden):
    code = (f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == "
            f"'trl' or m in {forbidden!r}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"


def test_what_a_registered_model_ships_imports_nothing_of_phi3ops():
    """chat_model_code.py and chat_runtime.py load in an environment without phi3ops; the
    model code may name the package only as its fallback inside a phi3ops checkout."""
    runtime = imported_modules(SRC / "phi3ops" / "chat_runtime.py")
    assert runtime <= {"__future__", "json", "collections", "pathlib", "loralib", "torch",
                       "safetensors", "peft", "transformers"}, runtime
    code = (SRC / "phi3ops" / "chat_model_code.py").read_text()
    assert code.count("phi3ops.") == 1 and "from chat_runtime import" in code


def test_files_stay_readable():
    for path in list(SRC.rglob("*.py")) + list((SRC.parent / "flows").rglob("*.py")):
        assert len(path.read_text().splitlines()) <= 400, path

"""Import direction: cli -> flows/ -> pipeline -> the stage subpackages -> config and errors ->
libraries. Below the command line nothing under src/ imports Prefect or flows, each stage imports
only the stages it stands on, and inference (evaluation, serving) imports no training code."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def imported(path: Path) -> set[str]:
    """The dotted modules a file imports; `from phi3ops import x` imports the module phi3ops.x."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "phi3ops":
                names |= {f"phi3ops.{alias.name}" for alias in node.names}
    return names


def imported_modules(path: Path) -> set[str]:
    """The top-level packages a file imports."""
    return {name.split(".")[0] for name in imported(path)}


FRONT_DOOR = SRC / "phi3ops" / "cli" / "main.py"  # `phi3ops run` starts the flow: above flows/


def test_src_never_imports_prefect_or_flows():
    offenders = {str(p.relative_to(SRC)): sorted(imported_modules(p) & {"prefect", "flows"})
                 for p in SRC.rglob("*.py") if p != FRONT_DOOR}
    assert {k: v for k, v in offenders.items() if v} == {}
    # The front door loads the project's flows/retrain.py by path, with Prefect's entry-point
    # loader, as a deployment does: it imports neither the flows nor the rest of Prefect.
    prefect = {name for name in imported(FRONT_DOOR) if name.split(".")[0] in ("prefect", "flows")}
    assert prefect == {"prefect.utilities.importtools"}


GROUND = {"config", "errors", "progress", "locking", "retry"}  # what every stage may use
STANDS_ON = {  # each room of src/phi3ops and the rooms it may import, besides the ground
    "data": set(),
    "model": {"data"},  # the tiny base is pretrained on the demo data
    "evaluation": {"data", "model"},
    "serve": {"model"},
    "registry": {"data", "model", "serve"},  # a registered model ships serve's code
    "train": {"data", "model", "registry"},  # training metrics stream into the MLflow run
    "steps": {"data", "model", "train", "evaluation", "registry"},  # each step calls its stage
    "report": {"registry", "steps"},
    "pipeline": {"data", "model", "train", "evaluation", "registry", "report", "steps"},
    "config": {"errors", "model.templates"},  # a template's name becomes its text at load
    "progress": {"config"}, "locking": {"errors"}, "retry": {"config", "errors"},
    "errors": set(),
}


def phi3ops_imports(path: Path) -> set[str]:
    """The phi3ops modules a file imports, as dotted paths below phi3ops."""
    return {name.removeprefix("phi3ops.") for name in imported(path)
            if name.startswith("phi3ops.")}


def room_of(module: str) -> str:
    return module.split(".")[0]


def test_each_stage_imports_only_what_it_stands_on():
    package = SRC / "phi3ops"
    wrong = []
    for path in package.rglob("*.py"):
        relative = path.relative_to(package).with_suffix("")
        room = relative.parts[0]
        if room in ("cli", "__init__"):  # the command line wires everything
            continue
        allowed = STANDS_ON[room]
        for module in phi3ops_imports(path):
            target = room_of(module)
            ok = (target == room or module in allowed or target in allowed
                  or (target in GROUND and room not in GROUND))
            if not ok:
                wrong.append(f"{relative.as_posix()}.py imports phi3ops.{module}")
    assert wrong == [], "imports against the layering (STANDS_ON):\n" + "\n".join(wrong)


def test_every_room_has_a_rule_and_says_what_it_owns():
    package = SRC / "phi3ops"
    rooms = {p.stem if p.is_file() else p.name for p in package.iterdir()
             if p.suffix == ".py" or (p / "__init__.py").is_file()} - {"__init__", "cli"}
    assert rooms == set(STANDS_ON)
    for folder in (p for p in package.iterdir() if (p / "__init__.py").is_file()):
        assert ast.get_docstring(ast.parse((folder / "__init__.py").read_text())), folder


TRAINING = ("phi3ops.train.trainer", "phi3ops.train.launch", "phi3ops.train.lm_head")


@pytest.mark.parametrize("module, forbidden", [
    ("phi3ops.model.inference", TRAINING), ("phi3ops.evaluation.scoring", TRAINING),
    ("phi3ops.serve.artifacts", (*TRAINING, "phi3ops.evaluation.scoring", "evaluate")),
    # `phi3ops chat`: its two halves start in parallel
    ("phi3ops.serve.chat", ("mlflow", "torch", "transformers"))])
def test_inference_imports_no_training_code(module, forbidden):
    code = (f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == "
            f"'trl' or m in {forbidden!r}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"


def test_what_a_registered_model_ships_imports_nothing_of_phi3ops():
    """chat_model_code.py and chat_runtime.py load in an environment without phi3ops; the
    model code may name the package only as its fallback inside a phi3ops checkout."""
    from phi3ops.serve.artifacts import MODEL_CODE, RUNTIME_CODE  # the files registration logs

    runtime = imported_modules(Path(RUNTIME_CODE))
    assert runtime <= {"__future__", "json", "collections", "pathlib", "loralib", "torch",
                       "safetensors", "peft", "transformers"}, runtime
    code = Path(MODEL_CODE).read_text()
    assert code.count("phi3ops.") == 1 and "from chat_runtime import" in code


def test_files_stay_readable():
    for path in list(SRC.rglob("*.py")) + list((SRC.parent / "flows").rglob("*.py")):
        assert len(path.read_text().splitlines()) <= 400, path

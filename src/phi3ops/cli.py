"""The `phi3ops` command.

    phi3ops run --pipeline pipelines/tiny-cpu.yaml        # the whole retrain flow
    phi3ops chat --alias champion "What is the capital of France?"
    phi3ops promote --version 3
    phi3ops data version | phi3ops data validate PATH | phi3ops data demo --out DIR
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from phi3ops.config import ProjectPaths, load_config, load_mlflow_config
from phi3ops.errors import ConfigError, Phi3opsError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
data_app = typer.Typer(no_args_is_help=True, help="Dataset versions (DVC).")
app.add_typer(data_app, name="data")

Root = Annotated[Path, typer.Option(help="project root (holds mlflow.yaml, data.dvc, flows/)")]
Pipeline = Annotated[Path, typer.Option(help="pipeline YAML, relative to the root")]
DEFAULT_PIPELINE = Path("pipelines/tiny-cpu.yaml")


def _load_flow_module(root: Path):
    """Import flows/retrain.py by path: the CLI is a front door; the flow stays in flows/."""
    path = root / "flows" / "retrain.py"
    if not path.is_file():
        raise ConfigError(f"{path}: flow file not found (is --root the project root?)")
    spec = importlib.util.spec_from_file_location("phi3ops_flows_retrain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@app.command()
def run(
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides")] = None,
    pipeline: Pipeline = DEFAULT_PIPELINE, root: Root = Path("."),
):
    """Run the retrain flow: version data, preprocess, train, evaluate, register, promote."""
    paths = ProjectPaths(root)
    argv = ["--pipeline", str(pipeline), "--root", str(paths.root), *(overrides or [])]
    summary = _load_flow_module(paths.root).main(argv)
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def chat(
    prompt: Annotated[str, typer.Argument(help="the user's message")],
    alias: Annotated[str, typer.Option(help="registry alias to load")] = "champion",
    system: Annotated[str | None, typer.Option(help="optional system prompt")] = None,
    root: Root = Path("."),
):
    """Answer one prompt with the registered model behind an alias."""
    from phi3ops.registry import load_registered

    paths = ProjectPaths(root)
    mcfg = load_mlflow_config(paths.root / "mlflow.yaml").resolved(paths.root)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    typer.echo(load_registered(mcfg, alias).predict({"messages": messages})[0])


@app.command()
def promote(
    version: Annotated[str, typer.Option(help="registered model version to promote")],
    root: Root = Path("."),
):
    """Move @champion to a version if it beats the current champion under the policy."""
    from phi3ops.registry import promote as promote_version

    paths = ProjectPaths(root)
    mcfg = load_mlflow_config(paths.root / "mlflow.yaml").resolved(paths.root)
    decision = promote_version(mcfg, version)
    typer.echo(f"v{decision.version}: {'promoted' if decision.promoted else 'not promoted'}: "
               f"{decision.reason}")


@data_app.command("version")
def data_version(pipeline: Pipeline = DEFAULT_PIPELINE, root: Root = Path(".")):
    """dvc pull (or regenerate the demo) if data/ is missing, dvc add, dvc push."""
    from phi3ops.data import version_data

    paths = ProjectPaths(root)
    v = version_data(paths.root, load_config(paths.pipeline(pipeline)).data)
    typer.echo(f"{v.md5}  {v.n_rows} rows in {v.n_files} files ({v.source}, git {v.git_rev})")
    if v.changed:
        typer.echo("data.dvc changed: git add data.dvc && git commit -m 'data: new version'")


@data_app.command("validate")
def data_validate(
    path: Annotated[Path, typer.Argument(help="a .jsonl file or a folder of them")],
    quarantine: Annotated[Path, typer.Option(help="where rejected lines go")] = Path(
        "quarantine.jsonl"),
    pipeline: Pipeline = DEFAULT_PIPELINE, root: Root = Path("."),
):
    """Check every line; rejected lines go to the quarantine file with file, line and rule."""
    from phi3ops.validation import TooManyRejectedError, jsonl_files, validate_files

    paths = ProjectPaths(root)
    max_fraction = load_config(paths.pipeline(pipeline)).preprocess.max_reject_fraction
    report = validate_files(jsonl_files(path), Path.cwd(), quarantine)
    typer.echo(report.summary())
    if report.n_rejected:
        typer.echo(f"rejected lines: {quarantine}")
    try:
        report.check(max_fraction)
    except TooManyRejectedError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@data_app.command("demo")
def data_demo(out: Annotated[Path, typer.Option(help="directory to write into")] = Path("data")):
    """Write the seeded demo chat dataset."""
    from phi3ops.demo_data import write_demo_dataset

    typer.echo(write_demo_dataset(out))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("phi3ops").setLevel(logging.INFO)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        app()
    except Phi3opsError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

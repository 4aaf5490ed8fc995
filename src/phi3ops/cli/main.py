"""Keep a Phi-3 chat model fine-tuned on your own data: DVC versions -> LoRA -> MLflow registry.

    phi3ops run --pipeline pipelines/tiny-cpu.yaml        # the whole retrain flow
    phi3ops train --pipeline pipelines/tiny-cpu.yaml --nproc 2   # only training (DDP)
    phi3ops chat --alias champion "What is the capital of France?"
    phi3ops evaluate --model models:/phi3ops-chat@champion
    phi3ops promote --version 3 | phi3ops promote --rollback
    phi3ops models | phi3ops models diff 1 3      # list the versions, compare two
    phi3ops trust --version 2      # record the file hashes of a version registered before them
    phi3ops plan --pipeline pipelines/phi3-mini-lora.yaml --gpu H200   # size a run, no weights
    phi3ops data add PATH | version | status | validate PATH | diff REV_A REV_B | demo
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from phi3ops.cli.data import data_app
from phi3ops.cli.options import (
    DEFAULT_PIPELINE,
    MLFLOW_TIMEOUT_S,
    MlflowTimeout,
    Pipeline,
    Root,
    load_pipeline,
    mlflow_config,
    open_registry,
)
from phi3ops.config import ProjectPaths
from phi3ops.errors import ConfigError, Phi3opsError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
app.add_typer(data_app, name="data")
models_app = typer.Typer(help="Registered versions: list them, compare two (`models diff A B`).")
app.add_typer(models_app, name="models")

DEBUG, DEBUG_HELP = {"on": False}, "a user error's traceback too (else one paragraph, exit 2)"


@app.callback()
def options(debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False):
    DEBUG["on"] = debug


@app.command()
def run(
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides")] = None,
    pipeline: Pipeline = DEFAULT_PIPELINE, root: Root = Path("."),
    data_rev: Annotated[str | None, typer.Option(
        help="train on the dataset of this git rev or tag (default: data.dvc in the work tree)"
    )] = None,
    force: Annotated[bool, typer.Option(
        help="train even when data, config and code are the champion's")] = False,
    lock_timeout: Annotated[float | None, typer.Option(
        min=0, metavar="SECONDS", help="while another retrain of the same model runs, wait at "
        "most this long (0: fail at once); default: wait until it ends")] = None,
    mlflow_timeout: MlflowTimeout = MLFLOW_TIMEOUT_S,
    as_json: Annotated[bool, typer.Option("--json", help="print the whole result as JSON")] = False,
):
    """Run the retrain flow: version data, preprocess, train, evaluate, register, promote."""
    from phi3ops.model.preflight import preflight

    paths = ProjectPaths(root)
    # Fail before Prefect starts, with the fix in the message rather than a traceback.
    preflight(load_pipeline(paths, pipeline, overrides), paths.models)
    registry = open_registry(paths, mlflow_timeout)
    prefect_ui = use_local_prefect_server()
    retrain = project_flow(paths.root)
    summary = retrain(pipeline=str(pipeline), overrides=overrides, root=str(paths.root),
                      data_rev=data_rev, force=force, lock_timeout_s=lock_timeout)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from phi3ops.report import brief

    experiment = registry.client.get_run(summary["run_id"]).info.experiment_id
    typer.echo(brief(summary, registry.config, experiment))
    typer.echo(f"  Prefect UI: {prefect_ui}" if prefect_ui else
               "  Prefect: this run's server was temporary; start `make prefect-server` first "
               "to keep its artifacts (retrain-summary, sample-answers) in view")


FLOW_ENTRYPOINT = "flows/retrain.py"


def project_flow(root: Path):
    """The retrain flow of the project at `root`, loaded the way a Prefect deployment loads its
    entrypoint (Prefect's loader, the project root as the working directory), so `phi3ops run`
    and a deployment run the same file, the one the code hash covers."""
    from prefect.utilities.importtools import import_object

    if not (root / FLOW_ENTRYPOINT).is_file():
        raise ConfigError(
            f"{root / FLOW_ENTRYPOINT} not found: `phi3ops run` runs the project's own flow. Run "
            "it in a phi3ops project (a clone of the phi3ops repository holds flows/, pipelines/ "
            "and mlflow.yaml), or point --root at one.")
    os.chdir(root)  # what the flow file imports (flows.steps) comes from this project
    return import_object(f"{FLOW_ENTRYPOINT}:in_project")(root)


def use_local_prefect_server(port: int = 4200) -> str | None:
    """Point Prefect at the local server `make prefect-server` started, when one answers and no
    PREFECT_API_URL is set, so the run and its artifacts stay in its UI. Returns the UI's URL."""
    import urllib.request

    api = os.environ.get("PREFECT_API_URL")
    if api is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1)
        except OSError:
            return None
        api = os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    return api.removesuffix("/api")


@app.command()
def train(
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides")] = None,
    pipeline: Pipeline = DEFAULT_PIPELINE, root: Root = Path("."),
    nproc: Annotated[int | None, typer.Option(
        help="processes (DDP: gloo on CPU, nccl on GPU); default launch.nproc")] = None,
    out: Annotated[Path | None, typer.Option(
        help="run directory (checkpoints, adapter); rerun with the same one to resume")] = None,
    data_rev: Annotated[str | None, typer.Option(help="dataset of this git rev or tag")] = None,
    force: Annotated[bool, typer.Option(
        help="train from scratch: drop the run directory's checkpoints and adapter")] = False,
):
    """Train an adapter on the current dataset, outside the flow (no MLflow run, no registry)."""
    from phi3ops import pipeline as stages
    from phi3ops.model.preflight import preflight
    from phi3ops.steps import Run

    paths = ProjectPaths(root)
    extra = [f"launch.nproc={nproc}"] if nproc else []
    cfg = load_pipeline(paths, pipeline, [*(overrides or []), *extra])
    # Machine, weights and template checked before fetching data; no MLflow run.
    run = Run(paths, cfg, checked=preflight(cfg, paths.models))
    dataset = stages.checkout(run, data_rev)
    stages.report_data(run, dataset)  # a secret in the data stops here (preprocess.on_secrets)
    prepared = stages.prepare(run, dataset)
    if prepared.template_note:
        typer.echo(f"warning: {prepared.template_note}", err=True)
    out_dir = (out or paths.runs / f"train-{cfg.name}-{cfg.config_hash()}").resolve()
    if force:
        for name in ("checkpoints", "adapter"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
    nodes = f" x {cfg.launch.nnodes} nodes" if cfg.launch.nnodes > 1 else ""
    typer.echo(f"training {cfg.adapter.backend} adapter on {cfg.launch.nproc} process(es){nodes}; "
               f"log: {out_dir / 'train.log'}")
    result = stages.fit(run, prepared, out_dir)
    if result.already_finished:
        typer.echo(f"{out_dir} is trained already (step {result.global_step} of "
                   f"{cfg.training_config.max_steps}): adapter in {result.adapter_dir}; "
                   "--force trains it again from scratch")
    typer.echo(json.dumps({k: v for k, v in result.to_json().items() if k != "history"},
                          indent=2))


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(
        help="models:/NAME@ALIAS, models:/NAME/VERSION, a run id, runs:/ID/adapter, or an "
             "adapter directory")],
    pipeline: Pipeline = DEFAULT_PIPELINE, root: Root = Path("."),
    data_rev: Annotated[str | None, typer.Option(help="held-out split of this git rev")] = None,
    mlflow_timeout: MlflowTimeout = MLFLOW_TIMEOUT_S,
    as_json: Annotated[bool, typer.Option("--json", help="the metrics as JSON")] = False,
):
    """Score one model on the held-out split of the pipeline's data, on its own."""
    from phi3ops.registry.store import check_registered, load_chat_model

    paths = ProjectPaths(root)
    cfg = load_pipeline(paths, pipeline)
    local = Path(model).is_dir()
    if not local:  # a missing or foreign model fails here, before the data is checked out
        registry = open_registry(paths, mlflow_timeout)
        check_registered(registry, model)  # also a bare run id: the adapter that run registered
    from phi3ops import pipeline as stages  # the heavy imports, once the model is known good
    from phi3ops.evaluation.scoring import held_out, run_model
    from phi3ops.model.base_model import load_tokenizer
    from phi3ops.model.inference import load_adapter_model
    from phi3ops.steps import Run

    run = Run(paths, cfg)
    prepared = stages.prepare(run, stages.checkout(run, data_rev))
    dataset = prepared.dataset
    if local:
        chat_model = (load_adapter_model(cfg.model, Path(model), paths.models),
                      load_tokenizer(cfg.model, paths.models))
    else:
        chat_model = load_chat_model(registry, model)
    conversations = held_out(prepared.data_dir, cfg.evaluation)
    _, metrics, _ = run_model(*chat_model, conversations, cfg.evaluation, model)
    if as_json:
        typer.echo(json.dumps({"dataset_md5": dataset.md5, "metrics": metrics}))
        return
    typer.echo(f"{model} on {len(conversations)} held-out conversations of {dataset.md5}:")
    for name, value in metrics.items():
        typer.echo(f"  {name:12s} {value:.4f}")


@app.command()
def chat(
    prompt: Annotated[str, typer.Argument(help="the user's message")],
    alias: Annotated[str, typer.Option(help="registry alias to load")] = "champion",
    version: Annotated[str | None, typer.Option(
        help="registered version to load instead of the alias")] = None,
    system: Annotated[str | None, typer.Option(help="optional system prompt")] = None,
    root: Root = Path("."), mlflow_timeout: MlflowTimeout = MLFLOW_TIMEOUT_S,
):
    """Answer one prompt with a registered model: the one behind an alias, or a version.

    Only a version phi3ops registered loads, with its files as recorded then (trusted_load.py).
    """
    from phi3ops.serve import chat as quick

    mcfg = mlflow_config(ProjectPaths(root))  # the helper process waits for the server
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    which = f"/{version}" if version is not None else f"@{alias}"
    chat_model = quick.load(mcfg.tracking_uri, f"models:/{mcfg.registered_model}{which}",
                            mlflow_timeout)
    typer.echo(chat_model.answer([messages])[0])
    quick.leave()


@app.command()
def lineage(
    version: Annotated[str, typer.Option(help="registered version")],
    root: Root = Path("."), mlflow_timeout: MlflowTimeout = MLFLOW_TIMEOUT_S,
    as_json: Annotated[bool, typer.Option("--json", help="the lineage as JSON")] = False,
):
    """Which data, code, config, run and environment made a version, its metrics with
    intervals, and its alias history."""
    from phi3ops.registry import history

    registry = open_registry(ProjectPaths(root), mlflow_timeout)
    found = history.lineage(registry, version)
    typer.echo(json.dumps(found, indent=2) if as_json
               else history.render_lineage(found, registry.config.promotion.metric))


@app.command()
def reproduce(
    version: Annotated[str, typer.Option(help="registered version")],
    root: Root = Path("."), mlflow_timeout: MlflowTimeout = MLFLOW_TIMEOUT_S,
    as_json: Annotated[bool, typer.Option("--json", help="the comparison as JSON")] = False,
):
    """Train and evaluate a version again from its record (code rev, data rev, config) without
    registering it; exit 0 when adapter and metrics match exactly, 1 when they differ."""
    from dataclasses import asdict

    from phi3ops.registry.reproduce import reproduce as rebuild

    paths = ProjectPaths(root)
    result = rebuild(open_registry(paths, mlflow_timeout), paths.root, version)
    typer.echo(json.dumps({**asdict(result), "reproducible": result.reproducible}, indent=2)
               if as_json else result.render())
    if not result.reproducible:
        raise typer.Exit(1)


@app.command()
def promote(
    version: Annotated[str | None, typer.Option(help="registered version to promote")] = None,
    rollback: Annotated[bool, typer.Option(help="@champion back to @previous-champion")] = False,
    root: Root = Path("."), mlflow_timeout: MlflowTimeout = MLFLOW_TIMEOUT_S,
):
    """Move @champion to a version if it wins under the policy, or roll it back."""
    from phi3ops.registry import promotion
    from phi3ops.registry.store import check_registered

    if (version is None) == (not rollback):
        raise ConfigError("give exactly one of --version N and --rollback")
    registry = open_registry(ProjectPaths(root), mlflow_timeout)
    if version is not None:  # it exists, and phi3ops registered it: never crown a foreign one
        check_registered(registry, f"models:/{registry.model}/{version}")
    decision = (promotion.rollback(registry) if rollback
                else promotion.promote(registry, version))
    if rollback:
        typer.echo(decision.reason)
    else:
        typer.echo(f"v{decision.version}: {'promoted' if decision.promoted else 'not promoted'}:"
                   f" {decision.reason}")


@models_app.callback(invoke_without_command=True)
def models(
    ctx: typer.Context, root: Root = Path("."), mlflow_timeout: MlflowTimeout = MLFLOW_TIMEOUT_S,
    as_json: Annotated[bool, typer.Option("--json", help="the rows as JSON")] = False,
):
    """Every registered version, newest first: aliases, decision, key metric, data, created."""
    if ctx.invoked_subcommand is not None:
        return
    from phi3ops.registry.history import list_versions, table

    rows = list_versions(open_registry(ProjectPaths(root), mlflow_timeout))
    typer.echo(json.dumps(rows, indent=2) if as_json else table(rows))


@models_app.command("diff")
def models_diff(
    a: Annotated[str, typer.Argument(help="the older version number")],
    b: Annotated[str, typer.Argument(help="the newer version number")],
    pipeline: Pipeline = DEFAULT_PIPELINE, root: Root = Path("."),
    mlflow_timeout: MlflowTimeout = MLFLOW_TIMEOUT_S,
):
    """Two versions side by side: metrics with intervals, the config diff, the data diff."""
    from phi3ops.registry.history import diff

    paths = ProjectPaths(root)
    registry = open_registry(paths, mlflow_timeout)
    typer.echo(diff(registry, a, b, paths.root, load_pipeline(paths, pipeline).data))


@app.command()
def trust(
    version: Annotated[str, typer.Option(help="registered version to record")],
    root: Root = Path("."), mlflow_timeout: MlflowTimeout = MLFLOW_TIMEOUT_S,
):
    """Record the sha256 of a version's files as they are now, for a version registered before
    phi3ops recorded them; later loads check them. Only for files you know are unchanged."""
    from phi3ops.registry.trusted_load import record_manifest

    registry = open_registry(ProjectPaths(root), mlflow_timeout)
    v = record_manifest(registry.uri, f"models:/{registry.model}/{version}")
    typer.echo(f"{v.name} v{v.version}: its files' sha256 recorded; loads check them from now on")


@app.command()
def plan(
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides")] = None,
    pipeline: Pipeline = DEFAULT_PIPELINE, root: Root = Path("."),
    gpu: Annotated[str, typer.Option(
        help="A100, H100 (SXM), H200, L4, or cpu: this machine")] = "H100",
    mfu: Annotated[float, typer.Option(
        min=0.01, max=1.0, help="model FLOPs utilisation to assume")] = 0.4,
    tokens: Annotated[int | None, typer.Option(
        min=1, help="tokens per epoch; skips reading the data")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
):
    """Size a run without its weights: memory per GPU, FLOPs per token, hours per epoch."""
    from dataclasses import asdict

    from phi3ops.train.plan import build_plan

    paths = ProjectPaths(root)
    result = build_plan(load_pipeline(paths, pipeline, overrides), paths, gpu, mfu, tokens)
    typer.echo(json.dumps(asdict(result), indent=2) if as_json else result.render())


def quiet_libraries() -> None:
    """phi3ops' own lines and Prefect's stage lines on screen; the libraries' bars, banners and
    deprecation notes off (`--debug` keeps tracebacks; the train log keeps everything)."""
    import warnings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights", shards
    # mlflow sets its logger's level when imported: table creation, "Creating initial tables"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    # mlflow colours this warning, so its text does not start the message
    warnings.filterwarnings("ignore", message=".*An input example was not provided")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("phi3ops").setLevel(logging.INFO)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # As under make: nothing is sent anywhere (offline, Prefect's telemetry only fails loudly).
    for name, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"),
                        ("DVC_NO_ANALYTICS", "1")):
        os.environ.setdefault(name, value)
    quiet_libraries()
    if argv is not None and "--debug" in argv:  # `python -m flows.retrain --debug`
        argv = ["--debug", *(a for a in argv if a != "--debug")]
    try:
        app(args=argv)
    except Phi3opsError as e:  # a user's mistake: one paragraph, exit 2; --debug: traceback too
        if DEBUG["on"]:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

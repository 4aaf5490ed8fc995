"""`phi3ops data ...`: dataset versions with DVC (add, version, status, pull, diff, validate,
demo)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from phi3ops.cli.options import DEFAULT_PIPELINE, Pipeline, Root, load_pipeline
from phi3ops.config import ProjectPaths

data_app = typer.Typer(no_args_is_help=True, help="Dataset versions (DVC).")


def _report_recorded(version, before: str | None) -> None:
    typer.echo(f"{version.md5}  {version.n_rows} rows in {version.n_files} files")
    if before != version.md5:
        typer.echo(f"new version (was {before}); commit it:\n"
                   "  git add data.dvc && git commit -m 'data: new version'")
    else:
        typer.echo("unchanged: data.dvc already records this version")


@data_app.command("version")
def data_version(pipeline: Pipeline = DEFAULT_PIPELINE, root: Root = Path(".")):
    """Record data/ as it is now: dvc add + dvc push."""
    from phi3ops.data.versions import record_version

    paths = ProjectPaths(root)
    _report_recorded(*record_version(paths.root, load_pipeline(paths, pipeline).data))


@data_app.command("add")
def data_add(
    source: Annotated[Path, typer.Argument(
        help="JSONL or JSON file, a folder of them, saved dataset, CSV, Parquet")],
    fmt: Annotated[str, typer.Option("--format", help="auto (detected from the first record), "
                                     "messages, openai, sharegpt or alpaca")] = "auto",
    role_map: Annotated[list[str] | None, typer.Option(
        help="a ShareGPT role name and what it is: NAME=user|assistant|system (repeatable)")
    ] = None,
    prompt_column: Annotated[str, typer.Option(help="table column of the user turn")] = "prompt",
    response_column: Annotated[str, typer.Option(help="column of the assistant turn")] = "response",
    system_column: Annotated[str | None, typer.Option(help="optional system column")] = None,
    quarantine: Annotated[Path, typer.Option(
        help="where the rejected lines of a refused file go")] = Path("quarantine.jsonl"),
    pipeline: Pipeline = DEFAULT_PIPELINE, root: Root = Path("."),
):
    """Import a dataset into data/ in the messages format, then dvc add + dvc push; all or
    nothing: a refused file leaves data/ and data.dvc as they were."""
    from phi3ops.data.formats import parse_role_map
    from phi3ops.data.ingest import Columns, Reading, add_dataset

    paths = ProjectPaths(root)
    cfg = load_pipeline(paths, pipeline)
    reading = Reading(fmt, parse_role_map(role_map),
                      Columns(prompt_column, response_column, system_column))
    version, before, read = add_dataset(paths.root, cfg.data, source, reading,
                                        cfg.preprocess.max_reject_fraction, quarantine)
    for done in read:
        typer.echo(f"wrote {done.written}: {done.summary()}")
    _report_recorded(version, before)


@data_app.command("status")
def data_status(
    verify: Annotated[bool, typer.Option(
        "--verify", help="read back and hash every object on the remote (default: the "
        "manifest and a sample of files)")] = False,
    pipeline: Pipeline = DEFAULT_PIPELINE, root: Root = Path("."),
):
    """Does data/ match data.dvc (every file hashed), and does the remote hold that version
    intact (objects read back and hashed)? Exit 1 on a remote problem, 2 on a workspace one."""
    from phi3ops.data.versions import REMOTE_SAMPLE, remote_status, verify_workspace
    from phi3ops.errors import DataError

    paths = ProjectPaths(root)
    cfg = load_pipeline(paths, pipeline).data
    workspace_error = None
    try:
        md5 = verify_workspace(paths.root, cfg)
        typer.echo(f"{cfg.path}/ matches {cfg.dvc_file} ({md5})")
    except DataError as e:  # the remote is still worth reporting: a pull would read it
        if not (paths.root / cfg.dvc_file).is_file():
            raise
        workspace_error = e
        typer.echo(f"error: {e}", err=True)
    check = remote_status(paths.root, cfg, sample=None if verify else REMOTE_SAMPLE)
    if problems := check.problems():
        typer.echo(f"error: {problems}", err=True)
    if workspace_error is not None:
        raise typer.Exit(2)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"remote holds this version ({check.n_hashed} of {check.n_objects} objects read "
               "back and hashed)")


@data_app.command("pull")
def data_pull(pipeline: Pipeline = DEFAULT_PIPELINE, root: Root = Path(".")):
    """Restore data/ to the version data.dvc records, as a run does: dvc pull (the seeded demo
    dataset where the remote truly lacks it), every file hashed. Reads only: nothing is pushed."""
    from phi3ops.data.versions import checkout_version

    paths = ProjectPaths(root)
    version = checkout_version(paths.root, load_pipeline(paths, pipeline).data)
    typer.echo(f"{version.md5}  {version.n_rows} rows in {version.n_files} files "
               f"({version.source})")


@data_app.command("diff")
def data_diff(
    rev_a: Annotated[str, typer.Argument(help="git rev or tag of the old version")],
    rev_b: Annotated[str, typer.Argument(help="git rev or tag of the new version")],
    pipeline: Pipeline = DEFAULT_PIPELINE, root: Root = Path("."),
):
    """Rows added/removed and the shift in length and role distributions between two revs."""
    from phi3ops.data.drift import diff_dirs
    from phi3ops.data.versions import checkout_version

    paths = ProjectPaths(root)
    cfg = load_pipeline(paths, pipeline).data
    a, b = (checkout_version(paths.root, cfg, rev) for rev in (rev_a, rev_b))
    typer.echo(diff_dirs(Path(a.path), Path(b.path), rev_a, rev_b).markdown())


@data_app.command("validate")
def data_validate(
    path: Annotated[Path, typer.Argument(help="a .jsonl file or a folder of them")],
    quarantine: Annotated[Path, typer.Option(help="where rejected lines go")] = Path(
        "quarantine.jsonl"),
    pipeline: Pipeline = DEFAULT_PIPELINE, root: Root = Path("."),
):
    """Check every line; rejected lines go to the quarantine file with file, line and rule.
    Exit 1 when more are rejected than allowed; 2 when the path is missing or has no line."""
    from phi3ops.data.formats import foreign
    from phi3ops.data.validation import TooManyRejectedError, jsonl_files, validate_files
    from phi3ops.errors import InvalidDataError

    paths = ProjectPaths(root)
    max_fraction = load_pipeline(paths, pipeline).preprocess.max_reject_fraction
    files = jsonl_files(path)
    for name in files:
        if (why := foreign(name)) is not None:
            raise InvalidDataError(why)
    report = validate_files(files, Path.cwd(), quarantine)
    typer.echo(report.summary())
    if report.n_rejected:
        typer.echo(f"rejected lines: {quarantine}")
    try:
        report.check(max_fraction)
    except TooManyRejectedError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@data_app.command("inspect")
def data_inspect(
    path: Annotated[Path | None, typer.Argument(
        help="a .jsonl file or a folder of them; default: the data/ of the work tree")] = None,
    rev: Annotated[str | None, typer.Option(help="inspect the version of a git rev instead")
                   ] = None,
    tokens: Annotated[bool, typer.Option(
        help="count tokens with the pipeline's tokenizer (loads it)")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="the findings as JSON")] = False,
    pipeline: Pipeline = DEFAULT_PIPELINE, root: Root = Path("."),
):
    """A report before training: rows, turns, roles, token lengths against max_length, exact and
    near duplicates, near duplicates across train and held-out, writing systems, and secrets or
    personal data with file:line. Exit 1 when a secret is found."""
    from phi3ops.data.inspection import inspect_files
    from phi3ops.data.validation import jsonl_files
    from phi3ops.data.versions import checkout_version

    paths = ProjectPaths(root)
    cfg = load_pipeline(paths, pipeline)
    if rev is not None:
        path = Path(checkout_version(paths.root, cfg.data, rev).path)
    tokenizer = None
    if tokens:
        from phi3ops.model.base_model import load_tokenizer

        tokenizer = load_tokenizer(cfg.model, paths.models)
    found = inspect_files(jsonl_files(path or paths.root / cfg.data.path), Path.cwd(),
                          cfg.preprocess, tokenizer)
    if as_json:
        typer.echo(json.dumps(found.as_json(), ensure_ascii=False, indent=1))
    else:
        typer.echo(found.markdown())
    if found.secrets:
        raise typer.Exit(1)


@data_app.command("demo")
def data_demo(out: Annotated[Path, typer.Option(help="directory to write into")] = Path("data")):
    """Write the seeded demo chat dataset."""
    from phi3ops.data.demo import write_demo_dataset

    typer.echo(write_demo_dataset(out))

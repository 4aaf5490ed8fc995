"""Bring a team's data into data/ in the messages format, ready for `dvc add`.

    phi3ops data add exports/support.parquet --prompt-column question --response-column answer

Accepts a JSONL file, a folder of JSONL files, a `datasets` dataset saved with save_to_disk, or a
CSV / Parquet table with prompt and response columns (and optionally a system column). JSONL is
copied byte for byte. An add is all or nothing: files are staged and validated with the rules
preprocessing applies, and a file with no valid conversation (empty, binary, wrong columns) or
more rejected lines than the pipeline tolerates is refused before anything reaches data/. An
accepted file keeps its few bad lines: preprocessing quarantines them with their file and line.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from phi3ops.config import DataConfig, PreprocessConfig
from phi3ops.data.validation import TooManyRejectedError, validate_files
from phi3ops.data.versions import DatasetVersion, record_version, verify_workspace
from phi3ops.errors import DataError, InvalidDataError

TABLE_SUFFIXES = {".csv", ".parquet", ".pq"}


@dataclass(frozen=True)
class Columns:
    prompt: str = "prompt"
    response: str = "response"
    system: str | None = None


def to_messages(record: dict, columns: Columns) -> dict:
    """One table row as a conversation; a row whose cells are missing is kept as-is, so that
    validation can quarantine it with a reason instead of it vanishing here."""
    if "messages" in record:
        return {"messages": record["messages"]}
    messages = []
    if columns.system and record.get(columns.system):
        messages.append({"role": "system", "content": record[columns.system]})
    messages += [{"role": "user", "content": record.get(columns.prompt)},
                 {"role": "assistant", "content": record.get(columns.response)}]
    return {"messages": messages}


def _records(source: Path) -> Iterator[dict]:
    if source.suffix in TABLE_SUFFIXES:
        import pandas as pd

        frame = pd.read_csv(source, dtype=str, keep_default_na=False) if source.suffix == ".csv" \
            else pd.read_parquet(source)
        yield from frame.to_dict(orient="records")
        return
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(source))
    splits = dataset.values() if isinstance(dataset, DatasetDict) else [dataset]
    for split in splits:
        yield from split


def _check_columns(first: dict, columns: Columns, source: Path) -> None:
    if "messages" in first:
        return
    wanted = [c for c in (columns.prompt, columns.response, columns.system) if c]
    missing = [c for c in wanted if c not in first]
    if missing:
        raise InvalidDataError(f"{source}: no column(s) {missing}; it has {sorted(first)}. "
                               "Name them with --prompt-column / --response-column / "
                               "--system-column")


def _write_jsonl(records: Iterable[dict], out: Path, columns: Columns, source: Path) -> int:
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for record in records:
            if n == 0:
                _check_columns(record, columns, source)
            row = to_messages(record, columns)
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            n += 1
    if n == 0:
        raise InvalidDataError(f"{source}: no rows")
    return n


def _destinations(source: Path) -> list[tuple[Path, Path]]:
    """(input file, path relative to data/) of every file an import writes."""
    if source.is_file() and source.suffix == ".jsonl":
        return [(source, Path(source.name))]
    if source.is_file() and source.suffix not in TABLE_SUFFIXES:
        raise InvalidDataError(f"{source}: not a .jsonl, .csv or .parquet file, nor a folder; "
                               "give chat JSONL, a table, or a `datasets` save_to_disk folder")
    if source.is_dir() and not (source / "dataset_info.json").is_file() \
            and not (source / "dataset_dict.json").is_file():
        files = sorted(source.rglob("*.jsonl"))
        if not files:
            raise InvalidDataError(f"{source}: a folder with no *.jsonl files and no saved "
                                   "dataset")
        return [(f, source.name / f.relative_to(source)) for f in files]
    return [(source, Path(f"{source.stem if source.is_file() else source.name}.jsonl"))]


def _stage(src: Path, dst: Path, columns: Columns) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix == ".jsonl":
        shutil.copyfile(src, dst)
        return
    try:
        _write_jsonl(_records(src), dst, columns, src)
    except ValueError as e:  # pandas, pyarrow and the UTF-8 codec raise ValueError subclasses
        raise InvalidDataError(f"{src}: cannot be read as a table or saved dataset: {e}") from None


def _validate(src: Path, staged: Path, staging: Path, max_reject_fraction: float,
              quarantine: Path | None) -> None:
    """The rules preprocessing applies, file by file: one with no valid conversation, or more
    rejected lines than the pipeline tolerates, is refused before it reaches data/."""
    kept = staging.parent / "quarantine.jsonl"
    report = validate_files([staged], staging, kept)
    try:
        report.check(max_reject_fraction)
    except (TooManyRejectedError, InvalidDataError) as e:
        converted = "" if src.suffix == ".jsonl" else f" (converted to {staged.name})"
        where = ""
        if quarantine is not None and report.n_rejected:
            quarantine.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kept, quarantine)
            where = f" Every rejected line, with its rule: {quarantine}."
        raise InvalidDataError(f"{src}{converted} was not added: {e}.{where}") from None


def remove_imported(written: list[Path], data_dir: Path, keep_data_dir: bool = True) -> None:
    """Undo an import: its files and the folders it left empty."""
    for path in written:
        path.unlink(missing_ok=True)
        for folder in path.parents:
            if folder == data_dir.parent or (folder == data_dir and keep_data_dir) \
                    or not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()


def import_dataset(source: Path, data_dir: Path, columns: Columns = Columns(),
                   max_reject_fraction: float = PreprocessConfig().max_reject_fraction,
                   quarantine: Path | None = None) -> list[Path]:
    """Copy or convert `source` into data_dir, all or nothing: every file is written to a
    staging folder beside data_dir and validated there, and only then moved in (a rename).
    Never overwrites. Returns the files written; rejected lines go to `quarantine` on refusal."""
    if not source.exists():
        raise InvalidDataError(f"{source}: no such file or folder")
    pairs = _destinations(source)
    clashes = [str(data_dir / rel) for _, rel in pairs if (data_dir / rel).exists()]
    if clashes:
        raise DataError(f"would overwrite {clashes}; rename the source or remove them first")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".phi3ops-add-", dir=data_dir.parent) as tmp:
        staging = Path(tmp) / "data"
        for src, rel in pairs:
            _stage(src, staging / rel, columns)
            _validate(src, staging / rel, staging, max_reject_fraction, quarantine)
        written: list[Path] = []
        try:
            for _, rel in pairs:
                (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(staging / rel, data_dir / rel)
                written.append(data_dir / rel)
        except BaseException:
            remove_imported(written, data_dir)
            raise
    return written


def add_dataset(root: Path, cfg: DataConfig, source: Path, columns: Columns = Columns(),
                max_reject_fraction: float = PreprocessConfig().max_reject_fraction,
                quarantine: Path | None = None,
                ) -> tuple[DatasetVersion, str | None, list[Path]]:
    """`phi3ops data add`: import into data/ and record the result (dvc add + dvc push), all or
    nothing. data/ must first be the version data.dvc records: a new version is data/ as it is,
    so one not pulled would drop the recorded rows, and one edited would slip edits in. Any
    failure leaves data/ and data.dvc as they were, byte for byte."""
    data_dir, dvc_file = root / cfg.path, root / cfg.dvc_file
    if dvc_file.is_file():
        try:
            verify_workspace(root, cfg)
        except DataError as e:
            raise DataError(
                f"not adding {source}: {e}\nA new version is {cfg.path}/ as it is, so it must "
                f"first hold the version {cfg.dvc_file} records (`phi3ops data status` shows "
                "what differs). Nothing was changed."
            ) from None
    recorded = dvc_file.read_bytes() if dvc_file.is_file() else None
    had_data_dir = data_dir.is_dir()
    written = import_dataset(source, data_dir, columns, max_reject_fraction, quarantine)
    try:
        version, before = record_version(root, cfg)
    except BaseException:
        remove_imported(written, data_dir, keep_data_dir=had_data_dir)
        if recorded is None:
            dvc_file.unlink(missing_ok=True)
        else:
            dvc_file.write_bytes(recorded)
        raise
    return version, before, written

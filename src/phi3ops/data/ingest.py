"""Bring a team's data into data/ in the messages format, ready for `dvc add`.

    phi3ops data add sharegpt.jsonl                 # ShareGPT, OpenAI, Alpaca: detected
    phi3ops data add exports/support.parquet --prompt-column question --response-column answer

Accepts a JSONL file, a JSON array (.json), a folder of JSONL files, a `datasets` dataset saved
with save_to_disk, or a CSV / Parquet table, holding conversations in any format of formats.py
(or, in a table, prompt and response columns and optionally a system column). JSONL already in
the messages format is copied byte for byte; every other source is written as messages JSONL,
the same bytes for the same input. An add is all or nothing: files are staged and validated
with the rules preprocessing applies, and a file with no valid conversation (empty, binary,
wrong columns) or more rejected lines than the pipeline tolerates is refused before anything
reaches data/. An accepted file keeps its few bad lines, as they were: preprocessing
quarantines them with their file and line.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from phi3ops.config import DataConfig, PreprocessConfig
from phi3ops.data import formats
from phi3ops.data.validation import TooManyRejectedError, validate_files
from phi3ops.data.versions import DatasetVersion, record_version, verify_workspace
from phi3ops.errors import DataError, InvalidDataError

TABLE_SUFFIXES = {".csv", ".parquet", ".pq"}
FILE_SUFFIXES = {".jsonl", ".json", *TABLE_SUFFIXES}


@dataclass(frozen=True)
class Columns:
    prompt: str = "prompt"
    response: str = "response"
    system: str | None = None


@dataclass(frozen=True)
class Reading:
    """How to read a source: its chat format ("auto": detected from its first record), names
    for odd ShareGPT roles, and a table's columns."""

    format: str = "auto"
    role_map: Mapping[str, str] = field(default_factory=dict)
    columns: Columns = Columns()


@dataclass
class Converted:
    """What staging one file did: the format it read, rows written, rows kept as they were
    because they could not be converted (by rule: validation quarantines them)."""

    source: Path
    format: str
    rows: int = 0
    kept_as_is: Counter = field(default_factory=Counter)
    written: Path | None = None  # where it landed in data/

    def summary(self) -> str:
        text = f"{self.source} ({self.format}): {self.rows} row(s)"
        if self.kept_as_is:
            text += f"; not converted (left for the quarantine): {dict(self.kept_as_is)}"
        return text


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
    if source.suffix == ".json":
        yield from _json_records(source)
        return
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


def _json_records(source: Path) -> list:
    """A .json file: an array of records (Alpaca's usual form), one record, or JSON lines."""
    text = source.read_text(encoding="utf-8-sig")
    try:
        found = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return found if isinstance(found, list) else [found]


def _format_of(first: object, reading: Reading, source: Path) -> str:
    """The format named, or the one the first record shows; "columns" for a table's rows."""
    if reading.format != "auto":
        if reading.format not in formats.FORMATS:
            raise InvalidDataError(f"--format {reading.format}: one of auto, "
                                   f"{', '.join(formats.FORMATS)}")
        return reading.format
    found = formats.detect(first)
    if found is None and isinstance(first, Mapping) and source.suffix != ".jsonl":
        return "columns"
    return found or "messages"


def _check_columns(first: dict, columns: Columns, source: Path) -> None:
    if "messages" in first:
        return
    wanted = [c for c in (columns.prompt, columns.response, columns.system) if c]
    missing = [c for c in wanted if c not in first]
    if missing:
        raise InvalidDataError(f"{source}: no column(s) {missing}; it has {sorted(first)}. "
                               "Name them with --prompt-column / --response-column / "
                               "--system-column")


def _write_converted(rows: Iterable[tuple[object, bytes | None]], out: Path, fmt: str,
                     reading: Reading, source: Path) -> Converted:
    """Each record as messages JSONL; one that cannot be converted is written as it was (its
    line, or its JSON), for validation to quarantine with its line number."""
    done = Converted(source, fmt)
    with out.open("wb") as f:
        for record, raw in rows:
            try:
                if record is None:
                    raise formats.ConversionError("invalid_json", "the line is not JSON")
                row = to_messages(record, reading.columns) if fmt == "columns" \
                    else formats.convert(record, fmt, reading.role_map)
                f.write((json.dumps(row, ensure_ascii=False, default=str) + "\n").encode())
                done.rows += 1
            except formats.ConversionError as e:
                f.write(raw if raw is not None else
                        (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode())
                done.kept_as_is[e.rule] += 1
    if not done.rows and not done.kept_as_is:
        raise InvalidDataError(f"{source}: no rows")
    return done


def _lines(lines: Iterable[bytes]) -> Iterator[tuple[object, bytes]]:
    """(record, raw line) of each non-blank JSONL line; None for a line that is not JSON."""
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8-sig"))
        except ValueError:  # not UTF-8, or not JSON
            record = None
        yield record, line if line.endswith(b"\n") else line + b"\n"


def _destinations(source: Path) -> list[tuple[Path, Path]]:
    """(input file, path relative to data/) of every file an import writes."""
    if source.is_file() and source.suffix == ".jsonl":
        return [(source, Path(source.name))]
    if source.is_file() and source.suffix not in FILE_SUFFIXES:
        raise InvalidDataError(f"{source}: not a .jsonl, .json, .csv or .parquet file, nor a "
                               "folder; give chat JSONL or JSON, a table, or a `datasets` "
                               "save_to_disk folder")
    if source.is_dir() and not (source / "dataset_info.json").is_file() \
            and not (source / "dataset_dict.json").is_file():
        files = sorted(f for f in source.rglob("*") if f.suffix in (".jsonl", ".json"))
        if not files:
            raise InvalidDataError(f"{source}: a folder with no *.jsonl or *.json files and no "
                                   "saved dataset")
        return [(f, (source.name / f.relative_to(source)).with_suffix(".jsonl")) for f in files]
    return [(source, Path(f"{source.stem if source.is_file() else source.name}.jsonl"))]


def _stage(src: Path, dst: Path, reading: Reading) -> Converted:
    """`src` as messages JSONL at `dst`: JSONL in that format byte for byte, the rest converted."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix == ".jsonl":  # streamed: read up to its first record, then once more
        with src.open("rb") as lines:
            first = next((record for record, _ in _lines(lines) if record is not None), None)
        fmt = _format_of(first, reading, src)
        with src.open("rb") as lines:
            if fmt != "messages":
                return _write_converted(_lines(lines), dst, fmt, reading, src)
            rows = sum(1 for line in lines if line.strip())
        shutil.copyfile(src, dst)
        return Converted(src, fmt, rows)
    try:
        records = iter(_records(src))
        first = next(records, None)
        if first is None:
            raise InvalidDataError(f"{src}: no rows")
        fmt = _format_of(first, reading, src)
        if fmt == "columns":
            _check_columns(first, reading.columns, src)
        rows = ((record, None) for record in (first, *records))
        return _write_converted(rows, dst, fmt, reading, src)
    except ValueError as e:  # json, pandas, pyarrow and UTF-8 errors are ValueError subclasses
        raise InvalidDataError(f"{src}: cannot be read as JSON, a table or a saved dataset: "
                               f"{e}") from None


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


def import_dataset(source: Path, data_dir: Path, reading: Reading = Reading(),
                   max_reject_fraction: float = PreprocessConfig().max_reject_fraction,
                   quarantine: Path | None = None) -> list[Converted]:
    """Copy or convert `source` into data_dir, all or nothing: every file is written to a
    staging folder beside data_dir and validated there, and only then moved in (a rename).
    Never overwrites. Returns what was read and written; rejected lines go to `quarantine` on
    refusal."""
    if not source.exists():
        raise InvalidDataError(f"{source}: no such file or folder")
    pairs = _destinations(source)
    clashes = [str(data_dir / rel) for _, rel in pairs if (data_dir / rel).exists()]
    if clashes:
        raise DataError(f"would overwrite {clashes}; rename the source or remove them first")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".phi3ops-add-", dir=data_dir.parent) as tmp:
        staging = Path(tmp) / "data"
        read = []
        for src, rel in pairs:
            read.append(_stage(src, staging / rel, reading))
            _validate(src, staging / rel, staging, max_reject_fraction, quarantine)
        written: list[Path] = []
        try:
            for (_, rel), done in zip(pairs, read, strict=True):
                (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(staging / rel, data_dir / rel)
                written.append(data_dir / rel)
                done.written = data_dir / rel
        except BaseException:
            remove_imported(written, data_dir)
            raise
    return read


def add_dataset(root: Path, cfg: DataConfig, source: Path, reading: Reading = Reading(),
                max_reject_fraction: float = PreprocessConfig().max_reject_fraction,
                quarantine: Path | None = None,
                ) -> tuple[DatasetVersion, str | None, list[Converted]]:
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
    read = import_dataset(source, data_dir, reading, max_reject_fraction, quarantine)
    try:
        version, before = record_version(root, cfg)
    except BaseException:
        remove_imported([done.written for done in read], data_dir, keep_data_dir=had_data_dir)
        if recorded is None:
            dvc_file.unlink(missing_ok=True)
        else:
            dvc_file.write_bytes(recorded)
        raise
    return version, before, read

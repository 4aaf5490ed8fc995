"""Bring a team's data into data/ in the messages format, ready for `dvc add`.

    phi3ops data add exports/support.parquet --prompt-column question --response-column answer

Accepts a JSONL file, a folder of JSONL files, a `datasets` dataset saved with save_to_disk, or a
CSV / Parquet table with prompt and response columns (and optionally a system column). JSONL is
copied byte for byte: validation happens in preprocessing, where bad lines are quarantined with
their file and line, so nothing is lost on the way in.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from phi3ops.errors import DataError

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
        raise DataError(f"{source}: no column(s) {missing}; it has {sorted(first)}. Name them "
                        "with --prompt-column / --response-column / --system-column")


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
        out.unlink()
        raise DataError(f"{source}: no rows")
    return n


def import_dataset(source: Path, data_dir: Path, columns: Columns = Columns()) -> list[Path]:
    """Copy or convert `source` into data_dir; returns the files written. Never overwrites."""
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    data_dir.mkdir(parents=True, exist_ok=True)
    if source.is_file() and source.suffix == ".jsonl":
        pairs = [(source, data_dir / source.name)]
    elif source.is_dir() and not (source / "dataset_info.json").is_file() \
            and not (source / "dataset_dict.json").is_file():
        files = sorted(source.rglob("*.jsonl"))
        if not files:
            raise DataError(f"{source}: a folder with no *.jsonl files and no saved dataset")
        pairs = [(f, data_dir / source.name / f.relative_to(source)) for f in files]
    else:
        pairs = [(source, data_dir / f"{source.stem if source.is_file() else source.name}.jsonl")]
    clashes = [str(dst) for _, dst in pairs if dst.exists()]
    if clashes:
        raise DataError(f"would overwrite {clashes}; rename the source or remove them first")
    written = []
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".jsonl":
            shutil.copyfile(src, dst)
        else:
            _write_jsonl(_records(src), dst, columns, src)
        written.append(dst)
    return written

"""Validate, deduplicate, split and measure the chat dataset; nothing is silently dropped.

    phi3ops run --pipeline pipelines/tiny-cpu.yaml      # stage 2 of the retrain flow

Every input line is either accepted or written to quarantine.jsonl with `file`, `line`, `rule`,
`detail` and the raw text. Output is a `datasets.DatasetDict` (train/test) saved under a
directory named by (dataset md5, preprocess config, tokenizer hash), so a rerun reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from phi3ops.config import PreprocessConfig, sha256_json

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")
DONE_MARKER = "stats.json"  # written last: its presence means the directory is complete


class RowError(ValueError):
    def __init__(self, rule: str, detail: str):
        super().__init__(f"{rule}: {detail}")
        self.rule, self.detail = rule, detail


@dataclass(frozen=True)
class Rejected:
    file: str
    line: int
    rule: str
    detail: str
    raw: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.rule}: {self.detail}"


@dataclass
class PreprocessResult:
    out_dir: str
    key: str
    n_lines: int
    n_accepted: int
    n_rejected: int
    n_duplicates: int
    n_too_long: int
    n_train: int
    n_test: int
    rejected_by_rule: dict[str, int] = field(default_factory=dict)
    max_tokens: int = 0
    mean_tokens: float = 0.0
    cached: bool = False

    @property
    def quarantine_path(self) -> Path:
        return Path(self.out_dir) / "quarantine.jsonl"


def validate_row(raw: bytes) -> dict:
    """Parse one JSONL line into `{"messages": [...]}` or raise RowError naming the rule broken."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowError("invalid_utf8", str(e)) from None
    text = text.removeprefix("\ufeff").rstrip("\r\n")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise RowError("invalid_json", e.msg + f" at column {e.colno}") from None
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"top level is {type(row).__name__}")
    if set(row) != {"messages"}:
        missing, extra = {"messages"} - set(row), set(row) - {"messages"}
        detail = f"missing {sorted(missing)}" if missing else f"unknown {sorted(extra)}"
        raise RowError("bad_keys", detail)
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise RowError("messages_not_list", "'messages' must be a non-empty list")
    previous = None
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or set(msg) != {"role", "content"}:
            raise RowError("bad_message", f"messages[{i}] must have exactly 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise RowError("bad_role", f"messages[{i}].role {role!r} not in {list(ROLES)}")
        if not isinstance(content, str):
            kind = type(content).__name__
            raise RowError("content_not_string", f"messages[{i}].content is {kind}")
        if not content.strip():
            raise RowError("empty_content", f"messages[{i}].content is empty or whitespace")
        if role == "system" and i != 0:
            raise RowError("system_not_first", f"messages[{i}] is a system turn after the first")
        if role == previous:
            raise RowError("repeated_role", f"messages[{i - 1}] and [{i}] are both {role!r}")
        previous = role
    if previous != "assistant":
        raise RowError("last_not_assistant", "the last turn must be the assistant's")
    if [m["role"] for m in messages if m["role"] != "system"][0] != "user":
        raise RowError("first_not_user", "the first non-system turn must be the user's")
    return {"messages": messages}


def read_rows(files: list[Path], root: Path) -> Iterator[tuple[dict | None, Rejected | None]]:
    """Yield (row, None) or (None, Rejected) for every line of every file, in order."""
    for path in files:
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue  # blank lines carry no data; not a rejection
                try:
                    yield validate_row(raw), None
                except RowError as e:
                    shown = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                    yield None, Rejected(name, lineno, e.rule, e.detail, shown)


def split_of(messages: list[dict], test_fraction: float, seed: int) -> str:
    """Deterministic split by content hash: a conversation keeps its split whatever its position."""
    digest = hashlib.sha256(f"{seed}:{json.dumps(messages, sort_keys=True)}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else str(tokenizer.vocab)
    return sha256_json([backend, tokenizer.chat_template])[:12]


def jsonl_files(data_dir: Path) -> list[Path]:
    files = sorted(p for p in data_dir.rglob("*.jsonl") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{data_dir}: no *.jsonl files to preprocess")
    return files


def preprocess(
    data_dir: Path, data_md5: str, cfg: PreprocessConfig, tokenizer: PreTrainedTokenizerBase,
    out_root: Path,
) -> PreprocessResult:
    key = sha256_json([data_md5, cfg.model_dump(), tokenizer_hash(tokenizer)])[:16]
    out_dir = out_root / key
    if (out_dir / DONE_MARKER).is_file():
        stats = json.loads((out_dir / DONE_MARKER).read_text())
        return PreprocessResult(**{**stats, "out_dir": str(out_dir), "cached": True})

    files = jsonl_files(data_dir)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    rejected: list[Rejected] = []
    seen: set[str] = set()
    n_lines = n_duplicates = n_too_long = 0
    lengths: list[int] = []
    for row, bad in read_rows(files, data_dir.parent):
        n_lines += 1
        if bad is not None:
            log.warning("quarantined %s", bad)
            rejected.append(bad)
            continue
        fingerprint = json.dumps(row["messages"], sort_keys=True)
        if fingerprint in seen:
            n_duplicates += 1
            continue
        seen.add(fingerprint)
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n_tokens > cfg.max_length:
            n_too_long += 1
            continue
        lengths.append(n_tokens)
        split = split_of(row["messages"], cfg.test_fraction, cfg.seed)
        splits[split].append({"messages": row["messages"], "text": text, "n_tokens": n_tokens})
    if not splits["train"] or not splits["test"]:
        raise ValueError(
            f"{data_dir}: too few valid conversations to split "
            f"(train {len(splits['train'])}, test {len(splits['test'])})"
        )

    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_root))
    DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
        str(staging / "dataset")
    )
    with (staging / "quarantine.jsonl").open("w", encoding="utf-8") as f:
        for r in rejected:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
    result = PreprocessResult(
        out_dir=str(out_dir), key=key, n_lines=n_lines, n_accepted=n_lines - len(rejected),
        n_rejected=len(rejected), n_duplicates=n_duplicates, n_too_long=n_too_long,
        n_train=len(splits["train"]), n_test=len(splits["test"]),
        rejected_by_rule=dict(Counter(r.rule for r in rejected)),
        max_tokens=max(lengths), mean_tokens=round(sum(lengths) / len(lengths), 2),
    )
    stats = {k: v for k, v in asdict(result).items() if k not in ("out_dir", "cached")}
    (staging / DONE_MARKER).write_text(json.dumps(stats, indent=2))
    if out_dir.exists():  # an incomplete earlier attempt
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return result


def load_processed(result_dir: Path | str) -> DatasetDict:
    return DatasetDict.load_from_disk(str(Path(result_dir) / "dataset"))

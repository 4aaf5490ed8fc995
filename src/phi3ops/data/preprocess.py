"""Validate, deduplicate, fit to length, split and measure the chat dataset; nothing is lost.

    phi3ops run --pipeline pipelines/tiny-cpu.yaml      # stage 2 of the retrain flow

Every input line is either accepted or written to quarantine.jsonl (see validation.py). Accepted
conversations longer than `max_length` tokens are cut at a turn boundary or dropped, and counted.
Output is a `datasets.DatasetDict` (train/test) with stats and a token-length histogram, saved
under a directory named by (dataset md5, preprocess config, tokenizer hash, code hash): a rerun
reuses it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from phi3ops.config import PreprocessConfig, sha256_json
from phi3ops.data import validation
from phi3ops.data.validation import jsonl_files, validate_files
from phi3ops.progress import Progress

DONE_MARKER = "stats.json"  # written last: its presence means the directory is complete


@dataclass
class PreprocessResult:
    out_dir: str
    key: str
    n_lines: int
    n_accepted: int
    n_rejected: int
    n_duplicates: int
    n_truncated: int
    n_too_long: int  # dropped: no prefix ending in an assistant turn fits max_length
    n_train: int
    n_test: int
    rejected_by_rule: dict[str, int] = field(default_factory=dict)
    messages_by_role: dict[str, int] = field(default_factory=dict)
    p50_tokens: int = 0
    p95_tokens: int = 0
    max_tokens: int = 0
    cached: bool = False

    def summary(self) -> str:
        return (f"{self.n_accepted} accepted, {self.n_rejected} quarantined "
                f"{self.rejected_by_rule} ({self.quarantine_path}), {self.n_duplicates} "
                f"duplicates, {self.n_truncated} truncated, {self.n_too_long} too long; turns by "
                f"role {self.messages_by_role}; tokens p50 {self.p50_tokens}, p95 "
                f"{self.p95_tokens}" + (" [cached: same data md5, config and tokenizer]"
                                        if self.cached else ""))

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items()
                if k.startswith(("n_", "p50_", "p95_", "max_"))}

    @property
    def quarantine_path(self) -> Path:
        return Path(self.out_dir) / "quarantine.jsonl"

    @property
    def histogram_path(self) -> Path:
        return Path(self.out_dir) / "token_lengths.png"


def split_of(messages: list[dict], test_fraction: float, seed: int) -> str:
    """Deterministic split by content hash: a conversation keeps its split whatever its position."""
    digest = hashlib.sha256(f"{seed}:{json.dumps(messages, sort_keys=True)}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of what decides the token ids; not of padding/truncation state, which calls change."""
    if tokenizer.is_fast:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    return sha256_json([spec, tokenizer.chat_template])[:12]


def code_hash() -> str:
    """Hash of the code that decides the output: a changed rule is a new key, not a stale hit.
    The module's name is in it too: a cached result names its class by module path."""
    sources = [Path(__file__), Path(validation.__file__)]
    code = __name__.encode() + b"".join(path.read_bytes() for path in sources)
    return hashlib.sha256(code).hexdigest()[:12]


def cache_key(data_md5: str, cfg: PreprocessConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """Same data, config, tokenizer and code: the same processed dataset."""
    return sha256_json([data_md5, cfg.model_dump(), tokenizer_hash(tokenizer), code_hash()])[:16]


def is_complete(out_dir: Path) -> bool:
    return (out_dir / DONE_MARKER).is_file()


def count_tokens(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return text, len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_to_length(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int, truncate: bool,
) -> tuple[list[dict], str, int] | None:
    """The conversation, or its longest prefix ending in an assistant turn, within max_length."""
    text, n_tokens = count_tokens(tokenizer, messages)
    if n_tokens <= max_length:
        return messages, text, n_tokens
    if truncate:
        ends = [i for i, m in enumerate(messages[:-1]) if m["role"] == "assistant"]
        for end in reversed(ends):
            prefix = messages[:end + 1]
            text, n_tokens = count_tokens(tokenizer, prefix)
            if n_tokens <= max_length:
                return prefix, text, n_tokens
    return None


def save_histogram(lengths: list[int], max_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=40, color="#3b6ea8")
    ax.axvline(max_length, color="#c0392b", linestyle="--", label=f"max_length {max_length}")
    ax.set(xlabel="tokens per conversation (chat template applied)", ylabel="conversations",
           title=f"Token lengths of {len(lengths)} conversations")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def preprocess(
    data_dir: Path, data_md5: str, cfg: PreprocessConfig, tokenizer: PreTrainedTokenizerBase,
    out_root: Path,
) -> PreprocessResult:
    key = cache_key(data_md5, cfg, tokenizer)
    out_dir = out_root / key
    if is_complete(out_dir):
        stats = json.loads((out_dir / DONE_MARKER).read_text())
        return PreprocessResult(**{**stats, "out_dir": str(out_dir), "cached": True})

    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_root))
    try:
        report = validate_files(jsonl_files(data_dir), data_dir.parent,
                                staging / "quarantine.jsonl")
        report.check(cfg.max_reject_fraction)
        splits: dict[str, list[dict]] = {"train": [], "test": []}
        seen: set[str] = set()
        roles: Counter = Counter()
        n_duplicates = n_truncated = n_too_long = 0
        bar = Progress("preprocess", len(report.accepted), unit="conversation")
        for done, row in enumerate(report.accepted, 1):
            bar.update(done)
            fingerprint = json.dumps(row["messages"], sort_keys=True)
            if fingerprint in seen:
                n_duplicates += 1
                continue
            seen.add(fingerprint)
            fitted = fit_to_length(row["messages"], tokenizer, cfg.max_length,
                                   truncate=cfg.overlength == "truncate")
            if fitted is None:
                n_too_long += 1
                continue
            messages, text, n_tokens = fitted
            n_truncated += messages is not row["messages"]
            roles.update(m["role"] for m in messages)
            # The split hashes the original conversation, so truncation never moves it.
            splits[split_of(row["messages"], cfg.test_fraction, cfg.seed)].append(
                {"messages": messages, "text": text, "n_tokens": n_tokens})
        bar.close()
        if not splits["train"] or not splits["test"]:
            raise ValueError(
                f"{data_dir}: too few valid conversations to split "
                f"(train {len(splits['train'])}, test {len(splits['test'])})"
            )

        DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
            str(staging / "dataset"))
        lengths = sorted(r["n_tokens"] for rows in splits.values() for r in rows)
        save_histogram(lengths, cfg.max_length, staging / "token_lengths.png")
        result = PreprocessResult(
            out_dir=str(out_dir), key=key, n_lines=report.n_lines,
            n_accepted=len(report.accepted), n_rejected=report.n_rejected,
            n_duplicates=n_duplicates, n_truncated=n_truncated, n_too_long=n_too_long,
            n_train=len(splits["train"]), n_test=len(splits["test"]),
            rejected_by_rule=dict(report.rejected_by_rule), messages_by_role=dict(roles),
            p50_tokens=percentile(lengths, 0.5), p95_tokens=percentile(lengths, 0.95),
            max_tokens=lengths[-1],
        )
        stats = {k: v for k, v in asdict(result).items() if k not in ("out_dir", "cached")}
        (staging / DONE_MARKER).write_text(json.dumps(stats, indent=2))
        if out_dir.exists():  # an incomplete earlier attempt
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except Exception as e:
        kept = out_root / f"quarantine-{key}.jsonl"
        if (staging / "quarantine.jsonl").is_file():  # the rejected lines are never lost
            shutil.move(staging / "quarantine.jsonl", kept)
            e.add_note(f"rejected lines with their reasons: {kept}")
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    return result


def load_processed(result_dir: Path | str) -> DatasetDict:
    return DatasetDict.load_from_disk(str(Path(result_dir) / "dataset"))

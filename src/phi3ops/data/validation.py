"""Row validation for chat JSONL: every line is accepted or quarantined with its reason.

    phi3ops data validate data/ --quarantine quarantine.jsonl

One rule per failure mode, each with a stable name, so a report can say how many lines broke
which rule, and a quarantine line (`file`, `line`, `rule`, `detail`, `raw`) can be fixed and fed
back. A UTF-8 BOM and CRLF line ends are accepted, not rejected.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from phi3ops.errors import InvalidDataError, Phi3opsError

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    def __init__(self, rule: str, detail: str):
        super().__init__(f"{rule}: {detail}")
        self.rule, self.detail = rule, detail


class TooManyRejectedError(Phi3opsError, ValueError):
    """More of the input was rejected than the configured fraction allows."""


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
class ValidationReport:
    n_lines: int = 0
    files: list[str] = field(default_factory=list)
    accepted: list[dict] = field(default_factory=list, repr=False)
    rejected_by_rule: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few `file:line: rule: detail`

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected_by_rule.values())

    @property
    def reject_fraction(self) -> float:
        return self.n_rejected / self.n_lines if self.n_lines else 0.0

    def check(self, max_reject_fraction: float) -> None:
        if self.reject_fraction > max_reject_fraction:
            raise TooManyRejectedError(
                f"{self.n_rejected} of {self.n_lines} lines rejected "
                f"({self.reject_fraction:.1%} > max_reject_fraction {max_reject_fraction:.1%}); "
                f"by rule: {dict(self.rejected_by_rule)}; first: {self.examples[:3]}"
            )
        if not self.accepted:  # an empty file: nothing rejected, nothing to train on either
            names = ", ".join(self.files[:3]) + (" ..." if len(self.files) > 3 else "")
            raise InvalidDataError(
                f"{names}: no conversation in {self.n_lines} line(s). Give one JSON object per "
                'line: {"messages": [{"role": "user", "content": "..."}, '
                '{"role": "assistant", "content": "..."}]}'
            )

    def summary(self) -> str:
        lines = [f"{self.n_lines} lines: {len(self.accepted)} accepted, {self.n_rejected} "
                 f"rejected ({self.reject_fraction:.1%})"]
        lines += [f"  {rule}: {count}" for rule, count in self.rejected_by_rule.most_common()]
        return "\n".join(lines)


def _check_messages(messages: object) -> None:
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


def validate_row(raw: bytes) -> dict:
    """Parse one JSONL line into `{"messages": [...]}` or raise RowError naming the rule broken."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowError("invalid_utf8", str(e)) from None
    text = text.removeprefix("\ufeff").rstrip("\r\n")
    if not text.strip():
        raise RowError("empty_line", "the line holds no JSON")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise RowError("invalid_json", f"{e.msg} at column {e.colno}") from None
    except RecursionError:
        raise RowError("invalid_json", "nested too deeply") from None
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"top level is {type(row).__name__}")
    if set(row) != {"messages"}:
        missing, extra = {"messages"} - set(row), set(row) - {"messages"}
        detail = f"missing {sorted(missing)}" if missing else f"unknown {sorted(extra)}"
        raise RowError("bad_keys", detail)
    _check_messages(row["messages"])
    return {"messages": row["messages"]}


def read_rows(path: Path, name: str) -> Iterator[tuple[dict | None, Rejected | None]]:
    """Yield (row, None) or (None, Rejected) for every line of one file, in order."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield validate_row(raw), None
            except RowError as e:
                shown = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                yield None, Rejected(name, lineno, e.rule, e.detail, shown)


def jsonl_files(path: Path) -> list[Path]:
    """A .jsonl file, or every .jsonl file under a folder, in a stable order."""
    if not path.exists():
        raise InvalidDataError(f"{path}: no such file or folder. Give a .jsonl file (one "
                               "conversation per line) or a folder of them.")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.jsonl") if p.is_file())
    if not files:
        raise InvalidDataError(f"{path}: a folder with no *.jsonl files. Give a .jsonl file "
                               "(one conversation per line) or a folder of them.")
    return files


def validate_files(files: list[Path], root: Path, quarantine: Path) -> ValidationReport:
    """Validate every line; rejected lines go to `quarantine` (JSONL) with file, line and rule."""
    report = ValidationReport()
    quarantine.parent.mkdir(parents=True, exist_ok=True)
    with quarantine.open("w", encoding="utf-8") as out:
        for path in files:
            name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
            report.files.append(name)
            for row, bad in read_rows(path, name):
                report.n_lines += 1
                if bad is None:
                    report.accepted.append(row)
                    continue
                report.rejected_by_rule[bad.rule] += 1
                if len(report.examples) < 20:  # the rest are in the quarantine file
                    report.examples.append(str(bad))
                    log.warning("quarantined %s", bad)
                out.write(json.dumps(asdict(bad), ensure_ascii=False) + "\n")
    return report

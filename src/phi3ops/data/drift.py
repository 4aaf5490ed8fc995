"""What changed between two dataset versions: rows added and removed, and distribution shift.

    phi3ops data diff v1.0 HEAD

Rows are compared by content (the conversation's messages), so reordering is not a change. Only
valid rows count; lengths are in characters so no tokenizer is needed.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, median

from phi3ops.config import DataConfig
from phi3ops.data.validation import jsonl_files, read_rows
from phi3ops.data.versions import checkout_version
from phi3ops.errors import DataError


@dataclass
class Profile:
    rows: set[str]
    chars: list[int]
    turns: list[int]
    roles: Counter

    def role_shares(self) -> dict[str, float]:
        total = sum(self.roles.values()) or 1
        return {role: n / total for role, n in sorted(self.roles.items())}


@dataclass
class DataDiff:
    label_a: str
    label_b: str
    a: Profile
    b: Profile

    @property
    def added(self) -> int:
        return len(self.b.rows - self.a.rows)

    @property
    def removed(self) -> int:
        return len(self.a.rows - self.b.rows)

    def markdown(self) -> str:
        def stats(p: Profile) -> tuple[float, float, float]:
            return (mean(p.chars or [0]), median(p.chars or [0]), mean(p.turns or [0]))

        (mean_a, med_a, turns_a), (mean_b, med_b, turns_b) = stats(self.a), stats(self.b)
        shares_a, shares_b = self.a.role_shares(), self.b.role_shares()
        lines = [
            f"# Data diff: `{self.label_a}` -> `{self.label_b}`", "",
            f"- conversations: {len(self.a.rows)} -> {len(self.b.rows)} "
            f"(+{self.added} added, -{self.removed} removed)", "",
            "| measure | a | b | shift |", "| --- | --- | --- | --- |",
            f"| mean characters | {mean_a:.1f} | {mean_b:.1f} | {mean_b - mean_a:+.1f} |",
            f"| median characters | {med_a:.1f} | {med_b:.1f} | {med_b - med_a:+.1f} |",
            f"| mean turns | {turns_a:.2f} | {turns_b:.2f} | {turns_b - turns_a:+.2f} |",
        ]
        for role in sorted(set(shares_a) | set(shares_b)):
            sa, sb = shares_a.get(role, 0.0), shares_b.get(role, 0.0)
            lines.append(f"| share of {role} turns | {sa:.1%} | {sb:.1%} | {sb - sa:+.1%} |")
        return "\n".join(lines) + "\n"


def profile(data_dir: Path) -> Profile:
    result = Profile(rows=set(), chars=[], turns=[], roles=Counter())
    for path in jsonl_files(data_dir):
        for row, _ in read_rows(path, str(path)):
            if row is None:
                continue
            key = json.dumps(row["messages"], sort_keys=True)
            if key in result.rows:
                continue
            result.rows.add(key)
            result.chars.append(sum(len(m["content"]) for m in row["messages"]))
            result.turns.append(len(row["messages"]))
            result.roles.update(m["role"] for m in row["messages"])
    return result


def diff_dirs(dir_a: Path, dir_b: Path, label_a: str, label_b: str) -> DataDiff:
    return DataDiff(label_a, label_b, profile(dir_a), profile(dir_b))


def diff_against_rev(root: Path, cfg: DataConfig, rev: str, rev_md5: str, current_dir: Path,
                     ) -> DataDiff | None:
    """Diff the dataset of `rev` (e.g. the champion's) against the current files. None when the
    rev's data.dvc does not name `rev_md5`: that run trained on uncommitted data ('-dirty')."""
    try:
        old = checkout_version(root, cfg, rev.removesuffix("-dirty"))
    except DataError:
        return None
    if old.md5 != rev_md5:
        return None
    return diff_dirs(Path(old.path), current_dir, f"{rev[:12]} (champion)", "this run")

"""A dataset as a whole, before it is trained on: what would hurt training or leak later.

    phi3ops data inspect               # data/ as it is
    phi3ops data inspect --rev data-v1 # any recorded version

Rows, turns and roles; token lengths against `preprocess.max_length` (how many would be cut or
dropped); exact and near duplicates (MinHash over word 3-grams, Jaccard >= 0.8); near duplicates
that preprocessing's content-hash split would put on both sides of train and held-out (the
held-out score would then measure memory); the mix of writing systems; and secrets or personal
data (keys, tokens, e-mail addresses, phone numbers) that the model would learn and repeat, each
with its file and line.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from phi3ops.config import PreprocessConfig
from phi3ops.data.preprocess import count_tokens, split_of
from phi3ops.data.validation import read_rows

NEAR = 0.8  # Jaccard similarity of word 3-grams from which two conversations are near duplicates
# Hand-written rather than a scanner library (detect-secrets, presidio): a few patterns over chat
# text, each with the kind it names; a scanner's plugins and models are built for code and
# documents. What matches is shown masked, never whole.
SECRETS = {
    "private key": r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----",
    "AWS access key": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "OpenAI-style API key": r"\bsk-[A-Za-z0-9_-]{20,}",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}\b",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",
    "Slack token": r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
    "password or key assignment": r"(?i)\b(?:api[_-]?key|secret|passw(?:or)?d|token)\b\s*[:=]\s*"
                                  r"['\"]?[^\s'\"]{8,}",
}
PERSONAL = {
    "e-mail address": r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b",
    "phone number": r"(?<![\w+])\+?\d{1,3}?[ .-]?\(?\d{2,4}\)?[ .-]\d{3,4}[ .-]\d{3,4}(?!\w)",
}
PATTERNS = {kind: re.compile(p) for kind, p in {**SECRETS, **PERSONAL}.items()}


@dataclass(frozen=True)
class Finding:
    where: str  # file:line
    kind: str
    shown: str  # the match, masked

    def __str__(self) -> str:
        return f"{self.where}: {self.kind} ({self.shown})"


@dataclass
class Inspection:
    rows: int = 0
    invalid: int = 0
    turns: Counter = field(default_factory=Counter)  # turns per conversation
    roles: Counter = field(default_factory=Counter)
    scripts: Counter = field(default_factory=Counter)  # conversations by main writing system
    lengths: list[int] = field(default_factory=list)  # tokens, chat template applied
    max_length: int = 0
    exact: list[tuple[str, str]] = field(default_factory=list)  # (duplicate, first seen)
    near: list[tuple[str, str, float]] = field(default_factory=list)
    across_splits: list[tuple[str, str, float]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def secrets(self) -> list[Finding]:
        return [f for f in self.findings if f.kind in SECRETS]

    @property
    def over_length(self) -> int:
        return sum(n > self.max_length for n in self.lengths)

    def as_json(self) -> dict:
        """The findings for `--json` and the MLflow run; secrets masked as in the markdown."""
        return {"rows": self.rows, "invalid": self.invalid, "turns": dict(self.turns),
                "roles": dict(self.roles), "scripts": dict(self.scripts),
                "max_length": self.max_length, "over_length": self.over_length,
                "token_lengths": self.lengths, "exact_duplicates": self.exact,
                "near_duplicates": self.near, "across_splits": self.across_splits,
                "findings": [{"where": f.where, "kind": f.kind, "shown": f.shown,
                              "secret": f.kind in SECRETS} for f in self.findings]}

    def markdown(self) -> str:
        lines = [f"# data report: {self.rows} conversations ({self.invalid} invalid lines)", "",
                 f"- turns: {dict(sorted(self.turns.items()))}; roles: {dict(self.roles)}",
                 f"- writing systems: {dict(self.scripts.most_common())}"]
        if self.lengths:
            ordered = sorted(self.lengths)
            lines.append(f"- tokens: median {ordered[len(ordered) // 2]}, max {ordered[-1]}; "
                         f"{self.over_length} over max_length {self.max_length}")
        lines.append(f"- exact duplicates: {len(self.exact)} (dropped by preprocessing)")
        lines += [f"  - {dup} repeats {first}" for dup, first in self.exact[:10]]
        lines.append(f"- near duplicates (>= {NEAR:.0%} alike): {len(self.near)}, of which "
                     f"{len(self.across_splits)} straddle train and held-out")
        lines += [f"  - {a} ~ {b} ({sim:.0%})" + (" across splits" if (a, b, sim) in
                                                  self.across_splits else "")
                  for a, b, sim in self.near[:10]]
        lines.append(f"- secrets: {len(self.secrets)}; personal data: "
                     f"{len(self.findings) - len(self.secrets)}")
        lines += [f"  - {finding}" for finding in self.findings[:20]]
        return "\n".join(lines)


def mask(text: str) -> str:
    return text[:4] + "*" * max(len(text) - 6, 3) + text[-2:] if len(text) > 8 else "*" * 8


def main_script(text: str) -> str:
    """The writing system most of a text's letters belong to (LATIN, DEVANAGARI, CJK...)."""
    scripts = Counter(unicodedata.name(ch, "UNKNOWN").split()[0] for ch in text if ch.isalpha())
    return scripts.most_common(1)[0][0] if scripts else "NONE"


def shingles(text: str) -> set[bytes]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i:i + 3]).encode() for i in range(max(len(words) - 2, 1))}


def inspect_files(files: list[Path], root: Path, cfg: PreprocessConfig | None = None,
                  tokenizer=None) -> Inspection:
    """The report over every line of `files`; token lengths only when given a tokenizer."""
    from datasketch import MinHash, MinHashLSH

    cfg = cfg or PreprocessConfig()
    found, seen = Inspection(max_length=cfg.max_length), {}
    lsh, sketches = MinHashLSH(threshold=NEAR, num_perm=128), {}  # line -> (sketch, split)
    for path in files:
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        for line, (row, bad) in enumerate(read_rows(path, name), start=1):
            here = f"{name}:{line}"
            if bad is not None:
                found.invalid += 1
                continue
            messages = row["messages"]
            text = "\n".join(m["content"] for m in messages)
            found.rows += 1
            found.turns[len(messages)] += 1
            found.roles.update(m["role"] for m in messages)
            found.scripts[main_script(text)] += 1
            found.findings += [Finding(here, kind, mask(match.group(0)))
                               for kind, pattern in PATTERNS.items()
                               for match in pattern.finditer(text)]
            if tokenizer is not None:
                found.lengths.append(count_tokens(tokenizer, messages)[1])
            key = json.dumps(messages, sort_keys=True)
            if key in seen:
                found.exact.append((here, seen[key]))
                continue
            seen[key] = here
            minhash, side = MinHash(num_perm=128), split_of(messages, cfg.test_fraction, cfg.seed)
            minhash.update_batch(list(shingles(text)))
            for other in lsh.query(minhash):
                similarity = minhash.jaccard(sketches[other][0])
                if similarity >= NEAR:
                    found.near.append((here, other, similarity))
                    if sketches[other][1] != side:
                        found.across_splits.append((here, other, similarity))
            lsh.insert(here, minhash)
            sketches[here] = (minhash, side)
    return found

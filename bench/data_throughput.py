"""Validation, conversion and inspection throughput, and preprocessing cold vs cached (a
benchmark, not a test).

    .venv/bin/python bench/data_throughput.py [--lines 100000]

Generates a JSONL file of `--lines` lines (the demo generator's conversations, 1% malformed),
times `validate_files` over it, then `preprocess` twice with the tiny tokenizer: the first run
does the work, the second finds the output under its cache key. Then the same conversations,
each made distinct by its row number, as ShareGPT JSONL: `import_dataset` converting them, and
`inspect_files` (the data report, without token counts) over the result.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from phi3ops.config import load_config  # noqa: E402
from phi3ops.data.demo import generate_conversations  # noqa: E402
from phi3ops.data.ingest import import_dataset  # noqa: E402
from phi3ops.data.inspection import inspect_files  # noqa: E402
from phi3ops.data.preprocess import preprocess  # noqa: E402
from phi3ops.data.validation import validate_files  # noqa: E402
from phi3ops.model.base_model import load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_lines(path: Path, n: int) -> None:
    # Conversations are distinct up to a few thousand; beyond that, repeats exercise dedup.
    pool = [json.dumps(row) for row in generate_conversations(5000, seed=7)]
    with path.open("w") as f:
        for i in range(n):
            f.write(('{"messages": [' if i % 100 == 99 else pool[i % len(pool)]) + "\n")


def write_sharegpt(path: Path, n: int) -> None:
    """`n` distinct conversations in ShareGPT's form: the demo's, each user turn numbered."""
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    pool = list(generate_conversations(5000, seed=7))
    with path.open("w") as f:
        for i in range(n):
            turns = [{"from": names[m["role"]], "value": m["content"]}
                     for m in pool[i % len(pool)]["messages"]]
            turns[-2 if turns[-2]["from"] == "human" else 0]["value"] += f" (#{i})"
            f.write(json.dumps({"conversations": turns}) + "\n")


def convert_and_inspect(tmp: Path, n: int) -> None:
    write_sharegpt(tmp / "sharegpt.jsonl", n)
    start = time.perf_counter()
    [done] = import_dataset(tmp / "sharegpt.jsonl", tmp / "converted")
    seconds = time.perf_counter() - start
    print(f"convert (sharegpt -> messages, staged and validated): {done.rows} rows in "
          f"{seconds:.2f} s = {done.rows / seconds:,.0f} rows/s")
    start = time.perf_counter()
    found = inspect_files([done.written], tmp)
    seconds = time.perf_counter() - start
    print(f"inspect (no token counts): {found.rows} rows in {seconds:.2f} s = "
          f"{found.rows / seconds:,.0f} rows/s; {len(found.near)} near duplicates, "
          f"{len(found.findings)} findings")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    cfg = load_config(ROOT / "pipelines" / "tiny-cpu.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        data.mkdir()
        write_lines(data / "big.jsonl", args.lines)
        size_mb = (data / "big.jsonl").stat().st_size / 1e6

        start = time.perf_counter()
        report = validate_files([data / "big.jsonl"], tmp, tmp / "quarantine.jsonl")
        seconds = time.perf_counter() - start
        print(f"validate: {report.n_lines} lines ({size_mb:.1f} MB) in {seconds:.2f} s = "
              f"{report.n_lines / seconds:,.0f} lines/s; {report.n_rejected} rejected")

        tokenizer = load_tokenizer(cfg.model, ROOT / ".cache" / "models")
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            result = preprocess(data, "bench", cfg.preprocess, tokenizer, tmp / "processed")
            timings.append(time.perf_counter() - start)
        assert result.cached, "the second run must reuse the first one's output"
        print(f"preprocess: cold {timings[0]:.2f} s, cached {timings[1]:.3f} s "
              f"({timings[0] / timings[1]:,.0f}x); {result.n_train} train / {result.n_test} test, "
              f"{result.n_duplicates} duplicates removed")
        convert_and_inspect(tmp, args.lines)


if __name__ == "__main__":
    main()

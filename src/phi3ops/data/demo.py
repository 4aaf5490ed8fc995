"""Seeded generator of the demo chat-instruction dataset (the default data/ of a fresh clone).

    phi3ops data demo --out data        # writes data/conversations.jsonl

The tasks are small closed-world facts and templates (capitals, opposites, colours, sums,
follow-up questions) so a CPU-sized model learns them in minutes and fine-tuning measurably beats
the base model. Output is byte-identical for a given seed, so its DVC md5 is reproducible.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

DEMO_FILE = "conversations.jsonl"
DEMO_SIZE = 1200
DEMO_SEED = 1234

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna",
    "Hungary": "Budapest", "Ireland": "Dublin", "Belgium": "Brussels", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Peru": "Lima", "Chile": "Santiago", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Cuba": "Havana", "Russia": "Moscow", "Turkey": "Ankara", "Iran": "Tehran",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Australia": "Canberra", "Nepal": "Kathmandu",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark",
    "open": "closed", "early": "late", "happy": "sad", "hard": "soft", "full": "empty",
    "old": "new", "rich": "poor", "wet": "dry", "strong": "weak", "long": "short",
    "high": "low", "near": "far", "loud": "quiet", "thick": "thin", "clean": "dirty",
}
COLOURS = {
    "banana": "yellow", "lemon": "yellow", "strawberry": "red", "tomato": "red",
    "cherry": "red", "lime": "green", "cucumber": "green", "blueberry": "blue",
    "carrot": "orange", "pumpkin": "orange", "eggplant": "purple", "plum": "purple",
    "coconut": "brown", "snowball": "white", "coal": "black", "sky": "blue",
}
SYSTEM_PROMPTS = [
    None,
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "You answer questions about facts and numbers.",
]
# Deliberately malformed rows: real team data is messy, and the demo shows them quarantined.
BAD_LINES = [
    '{"messages": [{"role": "user", "content": "What is the capital of France?"}',
    '{"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "hi"}]}',
    '{"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "ok"}]}',
]


def _capital(rng: random.Random) -> list[dict]:
    country = rng.choice(sorted(CAPITALS))
    question = rng.choice([
        "What is the capital of {c}?", "Name the capital city of {c}.",
        "Which city is the capital of {c}?",
    ]).format(c=country)
    turns = [("user", question), ("assistant", f"The capital of {country} is {CAPITALS[country]}.")]
    if rng.random() < 0.3:  # multi-turn follow-up
        other = rng.choice([c for c in sorted(CAPITALS) if c != country])
        turns += [("user", f"And {other}?"),
                  ("assistant", f"The capital of {other} is {CAPITALS[other]}.")]
    return turns


def _opposite(rng: random.Random) -> list[dict]:
    word = rng.choice(sorted(OPPOSITES))
    question = rng.choice(["What is the opposite of {w}?", "Give the antonym of {w}."])
    return [("user", question.format(w=word)),
            ("assistant", f"The opposite of {word} is {OPPOSITES[word]}.")]


def _colour(rng: random.Random) -> list[dict]:
    thing = rng.choice(sorted(COLOURS))
    question = rng.choice(["What colour is a {t}?", "Tell me the colour of a {t}."])
    return [("user", question.format(t=thing)), ("assistant", f"A {thing} is {COLOURS[thing]}.")]


def _sum(rng: random.Random) -> list[dict]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    question = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}."]).format(a=a, b=b)
    return [("user", question), ("assistant", f"{a} plus {b} is {a + b}.")]


TASKS = [(_capital, 4), (_opposite, 2), (_colour, 2), (_sum, 2)]


def generate_conversations(n: int = DEMO_SIZE, seed: int = DEMO_SEED) -> Iterator[dict]:
    """Yield `n` distinct conversations in the `{"messages": [...]}` format."""
    rng = random.Random(seed)
    makers = [maker for maker, weight in TASKS for _ in range(weight)]
    seen: set[str] = set()
    while len(seen) < n:
        system = rng.choice(SYSTEM_PROMPTS)
        turns = rng.choice(makers)(rng)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": role, "content": content} for role, content in turns
        ]
        key = json.dumps(messages, sort_keys=True)
        if key not in seen:
            seen.add(key)
            yield {"messages": messages}


def write_demo_dataset(out_dir: Path, n: int = DEMO_SIZE, seed: int = DEMO_SEED) -> Path:
    """Write the demo JSONL (valid rows plus a few malformed ones) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps(row, ensure_ascii=False) for row in generate_conversations(n, seed)]
    # Spread the bad lines through the file, as they would be in exported data.
    for i, bad in enumerate(BAD_LINES):
        rows.insert((i + 1) * len(rows) // (len(BAD_LINES) + 1), bad)
    path = out_dir / DEMO_FILE
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def tokenizer_corpus(seed: int = DEMO_SEED) -> Iterator[str]:
    """Text the tiny model's tokenizer is trained on: independent of data/ so that the base model
    (and with it every champion comparison) stays the same across dataset versions."""
    for row in generate_conversations(4 * DEMO_SIZE, seed):
        for message in row["messages"]:
            yield message["content"]

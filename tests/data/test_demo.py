import hashlib
import json

from phi3ops.data.demo import BAD_LINES, DEMO_SIZE, generate_conversations, write_demo_dataset


def test_demo_dataset_is_byte_identical_for_a_seed(tmp_path):
    a = write_demo_dataset(tmp_path / "a").read_bytes()
    b = write_demo_dataset(tmp_path / "b").read_bytes()
    assert hashlib.md5(a).hexdigest() == hashlib.md5(b).hexdigest()
    assert write_demo_dataset(tmp_path / "c", seed=7).read_bytes() != a


def test_demo_dataset_shape(tmp_path):
    lines = write_demo_dataset(tmp_path).read_text().splitlines()
    assert len(lines) == DEMO_SIZE + len(BAD_LINES)
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    conversations = [r["messages"] for r in rows]
    assert len(conversations) >= 1000
    assert any(c[0]["role"] == "system" for c in conversations)
    assert any(sum(m["role"] == "assistant" for m in c) >= 2 for c in conversations), "multi-turn"
    assert len({json.dumps(c) for c in conversations}) >= DEMO_SIZE


def test_conversations_are_distinct_and_end_with_the_assistant():
    seen = set()
    for row in generate_conversations(300):
        key = json.dumps(row)
        assert key not in seen
        seen.add(key)
        assert row["messages"][-1]["role"] == "assistant"

"""The chat formats teams hold (ShareGPT, OpenAI, Alpaca), read, detected and converted to the
messages format: unit rules first, then real imports into a data/ folder, then `phi3ops data
validate` naming a file in another format in one line."""

import json
from pathlib import Path

import pytest

from phi3ops.data.formats import ConversionError, convert, detect, parse_role_map
from phi3ops.data.ingest import Reading, import_dataset
from phi3ops.data.validation import validate_files
from phi3ops.errors import InvalidDataError
from tests.cli.test_cli import phi3ops
from tests.cli.test_cli_errors import one_paragraph

SHAREGPT = {"system": "Be brief.", "conversations": [
    {"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."},
    {"from": "human", "value": "And Italy?"}, {"from": "gpt", "value": "Rome."}]}
OPENAI = {"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Capital of France?", "name": "ann"},
                       {"role": "assistant", "content": "Paris.", "weight": 1}]}
ALPACA = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
MESSAGES = {"messages": [{"role": "user", "content": "Capital of France?"},
                         {"role": "assistant", "content": "Paris."}]}


def turns(row: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in row["messages"]]


def test_each_format_is_detected_from_one_record():
    assert [detect(r) for r in (SHAREGPT, OPENAI, ALPACA, MESSAGES)] == [
        "sharegpt", "openai", "alpaca", "messages"]
    assert detect({"text": "plain"}) is None and detect(["not", "a", "record"]) is None


def test_each_format_converts_to_the_same_turns():
    assert turns(convert(SHAREGPT, "sharegpt")) == [
        ("system", "Be brief."), ("user", "Capital of France?"), ("assistant", "Paris."),
        ("user", "And Italy?"), ("assistant", "Rome.")]
    assert turns(convert(OPENAI, "openai")) == [
        ("system", "Be brief."), ("user", "Capital of France?"), ("assistant", "Paris.")]
    assert turns(convert(ALPACA, "alpaca")) == [
        ("user", "Translate to French.\n\nGood morning"), ("assistant", "Bonjour")]
    assert turns(convert({**ALPACA, "input": ""}, "alpaca"))[0] == (
        "user", "Translate to French.")
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                       {"type": "text", "text": "there"}]},
                          {"role": "assistant", "content": "Hello"}]}
    assert turns(convert(parts, "openai"))[0] == ("user", "Hi there")


@pytest.mark.parametrize(("record", "fmt", "rule", "says"), [
    ({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", "unknown_role",
     "--role-map bot=user|assistant|system"),
    ({"conversations": [{"from": "function_call", "value": "{}"}]}, "sharegpt", "tool_turn",
     "tool call"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": None, "tool_calls": []}]}, "openai",
     "tool_turn", "plain chat"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": "y", "weight": 0}]}, "openai",
     "weight_zero", "set its weight to 1"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "openai", "not_text",
     "non-text"),
    ({"instruction": " ", "output": "y"}, "alpaca", "empty_instruction", "missing or empty"),
    ("a string", "sharegpt", "not_an_object", "not a JSON object"),
])
def test_what_cannot_be_converted_is_named(record, fmt, rule, says):
    with pytest.raises(ConversionError) as e:
        convert(record, fmt)
    assert e.value.rule == rule and says in e.value.detail


def test_odd_role_names_are_mapped_by_hand():
    record = {"conversations": [{"from": "Customer", "value": "hi"},
                                {"from": "Bot", "value": "yo"}]}
    mapped = convert(record, "sharegpt", parse_role_map(["customer=user", "bot=assistant"]))
    assert turns(mapped) == [("user", "hi"), ("assistant", "yo")]
    with pytest.raises(InvalidDataError, match="NAME=user, NAME=assistant or NAME=system"):
        parse_role_map(["bot=robot"])


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_files_in_each_format_land_in_data_as_valid_messages(tmp_path):
    source = tmp_path / "mixed"
    source.mkdir()
    write_jsonl(source / "sharegpt.jsonl", [SHAREGPT] * 40)
    write_jsonl(source / "openai.jsonl", [OPENAI] * 40)
    write_jsonl(source / "messages.jsonl", [MESSAGES] * 40)
    (source / "alpaca.json").write_text(json.dumps([ALPACA] * 40, indent=2))
    data = tmp_path / "data"
    read = {done.source.name: done for done in import_dataset(source, data)}

    assert {name: (done.format, done.rows) for name, done in read.items()} == {
        "alpaca.json": ("alpaca", 40), "messages.jsonl": ("messages", 40),
        "openai.jsonl": ("openai", 40), "sharegpt.jsonl": ("sharegpt", 40)}
    assert read["alpaca.json"].written == data / "mixed" / "alpaca.jsonl"
    assert (data / "mixed" / "messages.jsonl").read_bytes() == (
        source / "messages.jsonl").read_bytes(), "messages JSONL is copied byte for byte"
    report = validate_files(sorted(data.rglob("*.jsonl")), data, tmp_path / "q.jsonl")
    assert (report.n_lines, report.n_rejected) == (160, 0)
    assert turns(report.accepted[0]) == turns(convert(ALPACA, "alpaca"))


def test_a_conversion_is_byte_stable(tmp_path):
    write_jsonl(tmp_path / "chats.jsonl", [SHAREGPT, {**SHAREGPT, "system": "Ünïcode ✓"}])
    first, second = (import_dataset(tmp_path / "chats.jsonl", tmp_path / d)[0].written
                     for d in ("a", "b"))
    assert first.read_bytes() == second.read_bytes()
    assert "Ünïcode ✓" in first.read_text(encoding="utf-8")


def test_a_record_that_cannot_be_converted_is_kept_for_the_quarantine(tmp_path):
    bad = {"conversations": [{"from": "robot", "value": "x"}]}
    lines = [SHAREGPT] * 20 + [bad]
    write_jsonl(tmp_path / "chats.jsonl", lines)
    with (tmp_path / "chats.jsonl").open("a") as f:
        f.write("{not json\n")
    [done] = import_dataset(tmp_path / "chats.jsonl", tmp_path / "data",
                            max_reject_fraction=0.2)
    assert done.rows == 20 and dict(done.kept_as_is) == {"unknown_role": 1, "invalid_json": 1}
    report = validate_files([done.written], tmp_path, tmp_path / "q.jsonl")
    rejected = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert [(r["line"], r["rule"]) for r in rejected] == [(21, "bad_keys"), (22, "invalid_json")]
    assert json.loads(rejected[0]["raw"]) == bad, "the row as it came, nothing lost"
    assert report.n_lines == 22

    mapped = import_dataset(tmp_path / "chats.jsonl", tmp_path / "mapped", Reading(
        role_map={"robot": "assistant"}), max_reject_fraction=0.2)[0]
    assert dict(mapped.kept_as_is) == {"invalid_json": 1}


def test_validate_names_a_file_in_another_format_in_one_line(tmp_path):
    write_jsonl(tmp_path / "sharegpt.jsonl", [SHAREGPT] * 40)
    error = one_paragraph(phi3ops("data", "validate", str(tmp_path / "sharegpt.jsonl")))
    assert "holds sharegpt records" in error
    assert f"`phi3ops data add {tmp_path / 'sharegpt.jsonl'}` converts it" in error

    (tmp_path / "alpaca.json").write_text(json.dumps([ALPACA] * 202))
    result = phi3ops("data", "validate", str(tmp_path / "alpaca.json"))
    assert "is a JSON array, not JSON lines" in one_paragraph(result)
    assert "quarantined" not in result.stderr, "one line, not a warning per line"

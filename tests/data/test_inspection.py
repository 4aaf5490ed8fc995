"""The data report finds what was planted: an exact duplicate, a near duplicate, one that
straddles train and held-out, a secret and personal data with their lines, another writing
system, conversations over max_length; `phi3ops data inspect` prints it and fails on secrets."""

import json
from pathlib import Path

import pytest

from phi3ops.config import PreprocessConfig
from phi3ops.data.inspection import inspect_files, main_script, mask
from phi3ops.data.preprocess import split_of
from tests.cli.test_cli import phi3ops

CFG = PreprocessConfig(max_length=128)
SECRET = "AKIA" + "Q7XJ2M4PLK9R3TZW"  # the shape of an AWS access key id, made up
ANSWER = ("The warehouse ships orders placed before noon on the same working day, and orders "
          "placed after noon on the next working day, with tracking sent by message.")


def conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def near_copy(original: dict, straddle: bool) -> dict:
    """The same conversation with one word changed, on the same split as `original` or not."""
    side = split_of(original["messages"], CFG.test_fraction, CFG.seed)
    for n in range(1000):
        copy = conversation(original["messages"][0]["content"],
                            ANSWER.replace("noon", f"noon {n}", 1))
        if (split_of(copy["messages"], CFG.test_fraction, CFG.seed) != side) == straddle:
            return copy
    raise AssertionError("no such copy")


@pytest.fixture
def planted(tmp_path) -> Path:
    rows = [conversation(f"Question number {i} about topic {i * 7}?",
                         f"Answer {i}: the value is {i * 13} and the colour is shade {i}.")
            for i in range(30)]
    original = conversation("When do orders ship?", ANSWER)
    rows += [original, near_copy(original, straddle=True), rows[3],  # 31, 32, 33
             conversation("My key?", f"Use {SECRET} for the bucket."),  # 34
             conversation("Contact?", "Write to ann.lee@example.com or call +1 415-555-0134."),
             conversation("മലയാളത്തിൽ ഹലോ പറയൂ", "നമസ്കാരം, സുഖമാണോ?"),  # 36
             conversation("Tell me a long story", "word " * 200)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "data"


def test_the_report_finds_what_was_planted(planted, tiny_config, tiny_models):
    from phi3ops.model.base_model import load_tokenizer

    found = inspect_files([planted / "chat.jsonl"], planted, CFG,
                          load_tokenizer(tiny_config.model, tiny_models))
    assert (found.rows, found.invalid) == (37, 0)
    assert found.exact == [("chat.jsonl:33", "chat.jsonl:4")]
    assert [(a, b) for a, b, _ in found.near] == [("chat.jsonl:32", "chat.jsonl:31")]
    assert found.across_splits == found.near, "one side trained on, the other scored"
    assert [str(f) for f in found.secrets] == [f"chat.jsonl:34: AWS access key ({mask(SECRET)})"]
    assert {(f.where, f.kind) for f in found.findings} - {("chat.jsonl:34", "AWS access key")} \
        == {("chat.jsonl:35", "e-mail address"), ("chat.jsonl:35", "phone number")}
    assert found.scripts["MALAYALAM"] == 1 and found.scripts["LATIN"] == 36
    assert len(found.lengths) == 37 and found.over_length >= 1
    assert max(found.lengths) > CFG.max_length >= sorted(found.lengths)[len(found.lengths) // 2]
    report = found.markdown()
    assert SECRET not in report and "1 straddle train and held-out" in report


def test_inspect_prints_the_report_and_fails_on_a_secret(planted):
    result = phi3ops("data", "inspect", str(planted), "--no-tokens")
    assert result.returncode == 1, result.stderr
    assert "chat.jsonl:34: AWS access key" in result.stdout and SECRET not in result.stdout
    assert "exact duplicates: 1" in result.stdout

    clean = planted.parent / "clean"
    clean.mkdir()
    rows = (planted / "chat.jsonl").read_text().splitlines()
    (clean / "chat.jsonl").write_text("\n".join(rows[:30]) + "\n")
    as_json = phi3ops("data", "inspect", str(clean), "--no-tokens", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["rows"] == 30


def test_the_writing_system_is_the_one_most_letters_use():
    assert main_script("Hello, नमस्ते दुनिया") == "DEVANAGARI"
    assert main_script("你好 world") == "LATIN"
    assert main_script("123 !!") == "NONE"


def test_a_secret_in_the_data_stops_training_unless_the_policy_warns(project, tmp_path):
    from phi3ops import pipeline
    from phi3ops.config import ProjectPaths, load_config
    from phi3ops.data.ingest import add_dataset
    from phi3ops.data.versions import checkout_version
    from phi3ops.steps import Run
    from tests.cli.test_cli_errors import one_paragraph

    cfg = load_config(project / "pipelines" / "tiny-cpu.yaml")
    checkout_version(project, cfg.data)  # the demo data, then a file holding a key
    leak = conversation("Key?", f"It is {SECRET}.")
    (tmp_path / "leak.jsonl").write_text(json.dumps(leak) + "\n")
    dataset, _, _ = add_dataset(project, cfg.data, tmp_path / "leak.jsonl")

    error = one_paragraph(phi3ops("train", "--root", str(project), cwd=project))
    assert "1 secret(s) in dataset" in error and "leak.jsonl:1: AWS access key" in error
    assert "preprocess.on_secrets: warn" in error and SECRET not in error
    assert not list(project.glob("runs/*/train.log")), "nothing was trained"

    warn = cfg.model_copy(update={"preprocess": cfg.preprocess.model_copy(
        update={"on_secrets": "warn"})})
    found = pipeline.report_data(Run(ProjectPaths(project), warn), dataset)
    assert [f.where for f in found.secrets] == ["leak.jsonl:1"]

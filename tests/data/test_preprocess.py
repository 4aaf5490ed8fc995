import json

import pytest

from phi3ops.config import PreprocessConfig
from phi3ops.data.preprocess import load_processed, preprocess, split_of
from phi3ops.data.validation import RowError, TooManyRejectedError, validate_row
from phi3ops.model.base_model import load_tokenizer

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture(scope="module")
def tokenizer(tiny_config, tiny_models):
    return load_tokenizer(tiny_config.model, tiny_models)


@pytest.mark.parametrize("raw, rule", [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "not_an_object"),
    (b'{"msgs": []}', "bad_keys"),
    (b'{"messages": [], "extra": 1}', "bad_keys"),
    (b'{"messages": []}', "messages_not_list"),
    (b'{"messages": [{"role": "bot", "content": "x"}]}', "bad_role"),
    (b'{"messages": [{"role": "user", "content": 3}]}', "content_not_string"),
    (b'{"messages": [{"role": "user", "content": " \\t"}]}', "empty_content"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}',
     "system_not_first"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
     "repeated_role"),
    (b'{"messages": [{"role": "user", "content": "a"}]}', "last_not_assistant"),
    (b'{"messages": [{"role": "assistant", "content": "a"}]}', "first_not_user"),
    (b'{"messages": [{"role": "user"}]}', "bad_message"),
    (b"\xff\xfe{}", "invalid_utf8"),
    (b"   \r\n", "empty_line"),
])
def test_each_rule_is_named(raw, rule):
    with pytest.raises(RowError) as err:
        validate_row(raw)
    assert err.value.rule == rule


def test_bom_and_crlf_are_accepted():
    raw = b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n"
    assert validate_row(raw) == GOOD


def test_split_depends_on_content_not_position():
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
             for i in range(400)]
    first = [split_of(c, 0.25, 0) for c in convs]
    assert [split_of(c, 0.25, 0) for c in reversed(convs)] == list(reversed(first))
    assert 50 < first.count("test") < 150


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_bad_lines_are_quarantined_with_file_line_and_reason(tmp_path, tokenizer):
    good = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": f"{i} plus 1 is {i + 1}."}]}
            for i in range(40)]
    rows = good[:10] + ["{broken", good[0]] + good[10:] + [
        '{"messages": [{"role": "user", "content": "x"}]}']
    write(tmp_path / "data" / "chat.jsonl", rows)
    result = preprocess(tmp_path / "data", "md5-a", PreprocessConfig(test_fraction=0.2),
                        tokenizer, tmp_path / "out")
    assert result.n_lines == len(rows)
    assert result.n_rejected == 2 and result.n_duplicates == 1
    assert result.n_train + result.n_test == 40
    assert result.rejected_by_rule == {"invalid_json": 1, "last_not_assistant": 1}
    quarantined = [json.loads(x) for x in result.quarantine_path.read_text().splitlines()]
    assert [(q["file"], q["line"], q["rule"]) for q in quarantined] == [
        ("data/chat.jsonl", 11, "invalid_json"), ("data/chat.jsonl", 43, "last_not_assistant")]
    assert quarantined[0]["raw"] == "{broken"
    dataset = load_processed(result.out_dir)
    assert len(dataset["train"]) == result.n_train
    assert dataset["train"][0]["text"].startswith("<|user|>\n")
    assert dataset["train"][0]["n_tokens"] > 0


def test_rerun_with_the_same_key_is_cached(tmp_path, tokenizer):
    write(tmp_path / "data" / "a.jsonl", [GOOD] + [
        {"messages": [{"role": "user", "content": f"n{i}"},
                      {"role": "assistant", "content": "ok"}]} for i in range(30)])
    cfg = PreprocessConfig(test_fraction=0.2)
    first = preprocess(tmp_path / "data", "md5-b", cfg, tokenizer, tmp_path / "out")
    again = preprocess(tmp_path / "data", "md5-b", cfg, tokenizer, tmp_path / "out")
    assert not first.cached and again.cached and again.key == first.key
    assert again.n_train == first.n_train
    other = preprocess(tmp_path / "data", "md5-c", cfg, tokenizer, tmp_path / "out")
    assert not other.cached and other.key != first.key


def test_too_long_conversations_are_dropped_and_counted(tmp_path, tokenizer):
    long = {"messages": [{"role": "user", "content": "word " * 300},
                         {"role": "assistant", "content": "ok"}]}
    write(tmp_path / "data" / "a.jsonl", [long] + [
        {"messages": [{"role": "user", "content": f"n{i}"},
                      {"role": "assistant", "content": "ok"}]} for i in range(30)])
    cfg = PreprocessConfig(max_length=64, test_fraction=0.2)
    result = preprocess(tmp_path / "data", "md5", cfg, tokenizer, tmp_path / "out")
    assert result.n_too_long == 1 and result.n_train + result.n_test == 30


def test_too_many_rejected_fails_and_keeps_the_quarantine(tmp_path, tokenizer):
    write(tmp_path / "data" / "a.jsonl", ["{bad"] * 5 + [GOOD] * 5)
    with pytest.raises(TooManyRejectedError, match="5 of 10 lines rejected") as err:
        preprocess(tmp_path / "data", "md5", PreprocessConfig(), tokenizer, tmp_path / "out")
    kept = [n for n in err.value.__notes__ if "rejected lines" in n][0].split(": ", 1)[1]
    assert len(open(kept).read().splitlines()) == 5


def test_too_few_valid_conversations_is_a_clear_error(tmp_path, tokenizer):
    write(tmp_path / "data" / "a.jsonl", [GOOD])
    with pytest.raises(ValueError, match="too few valid conversations"):
        preprocess(tmp_path / "data", "md5", PreprocessConfig(), tokenizer, tmp_path / "out")


def test_long_multi_turn_conversation_is_cut_at_a_turn_boundary(tmp_path, tokenizer):
    long = {"messages": [{"role": "user", "content": "What is 1 plus 1?"},
                         {"role": "assistant", "content": "1 plus 1 is 2."},
                         {"role": "user", "content": "word " * 300},
                         {"role": "assistant", "content": "ok"}]}
    short = [{"messages": [{"role": "user", "content": f"n{i}"},
                           {"role": "assistant", "content": "ok"}]} for i in range(30)]
    write(tmp_path / "data" / "a.jsonl", [long] + short)
    cfg = PreprocessConfig(max_length=64, test_fraction=0.2)
    result = preprocess(tmp_path / "data", "md5", cfg, tokenizer, tmp_path / "out")
    assert result.n_truncated == 1 and result.n_too_long == 0
    dataset = load_processed(result.out_dir)
    kept = [r for split in ("train", "test") for r in dataset[split]
            if r["messages"][0]["content"] == "What is 1 plus 1?"]
    assert [m["content"] for m in kept[0]["messages"]] == ["What is 1 plus 1?", "1 plus 1 is 2."]
    assert kept[0]["n_tokens"] <= 64

    dropped = preprocess(tmp_path / "data", "md5", cfg.model_copy(update={"overlength": "drop"}),
                         tokenizer, tmp_path / "out")
    assert dropped.n_truncated == 0 and dropped.n_too_long == 1


def test_stats_count_roles_and_plot_lengths(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"n{i}"},
                          {"role": "assistant", "content": "ok"}]} for i in range(30)]
    write(tmp_path / "data" / "a.jsonl", rows)
    result = preprocess(tmp_path / "data", "md5", PreprocessConfig(test_fraction=0.2), tokenizer,
                        tmp_path / "out")
    assert result.messages_by_role == {"system": 30, "user": 30, "assistant": 30}
    assert result.histogram_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 < result.p50_tokens <= result.p95_tokens <= result.max_tokens


def test_tokenizer_hash_ignores_call_state(tokenizer):
    from phi3ops.data.preprocess import tokenizer_hash

    before = tokenizer_hash(tokenizer)
    tokenizer(["a", "a b c"], padding=True, truncation=True, max_length=2)
    assert tokenizer_hash(tokenizer) == before

import evaluate
import pytest

from phi3ops.evaluation import score, split_prompts
from phi3ops.metrics import metric_path


def test_metric_modules_load_offline_by_path():
    rouge = evaluate.load(metric_path("rouge"))
    result = rouge.compute(predictions=["the cat sat on the mat"],
                           references=["the cat sat on a mat"])
    assert 0.8 < result["rougeL"] < 1.0
    exact = evaluate.load(metric_path("exact_match"))
    assert exact.compute(predictions=[" Paris ", "Rome"], references=["paris", "Oslo"]) == {
        "exact_match": 0.5}


def test_unknown_metric_names_the_known_ones():
    with pytest.raises(ValueError, match="exact_match"):
        metric_path("bleurt")


def test_score_combines_rouge_and_exact_match():
    result = score(["The capital of France is Paris."], ["The capital of France is Paris."])
    assert result["rougeL"] == 1.0 and result["exact_match"] == 1.0
    assert score(["nothing alike"], ["The capital is Paris."])["rougeL"] == 0.0


def test_prompts_end_before_the_last_assistant_turn():
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    prompts, refs = split_prompts([conv])
    assert prompts == [conv[:3]] and refs == ["d"]

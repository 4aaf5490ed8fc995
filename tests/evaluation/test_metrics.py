import evaluate
import pytest

from phi3ops.evaluation.metrics import metric_path
from phi3ops.evaluation.scoring import score
from phi3ops.model.inference import split_prompts


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


def test_score_combines_all_metrics_with_per_sample_values():
    same = "The capital of France is Paris."
    result, per_sample = score([same, "nothing alike"], [same, "The capital is Paris."])
    assert set(result) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf",
                           "exact_match"}
    assert per_sample["rougeL"] == [1.0, 0.0] and per_sample["exact_match"] == [1.0, 0.0]
    assert result["rougeL"] == 0.5 and 0 < result["bleu"] < 1 and 0 < result["chrf"] < 1
    assert set(per_sample) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "chrf", "exact_match"}


def test_bleu_and_chrf_modules_match_sacrebleu():
    import sacrebleu

    preds, refs = ["the cat sat on the mat", "a dog"], ["the cat sat on a mat", "a big dog"]
    bleu = evaluate.load(metric_path("bleu")).compute(predictions=preds, references=refs)
    assert bleu["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score / 100)
    chrf = evaluate.load(metric_path("chrf")).compute(predictions=preds, references=refs)
    assert chrf["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score / 100)


def test_bootstrap_interval_brackets_the_mean_and_excludes_zero_for_a_clear_gain():
    from phi3ops.evaluation.scoring import bootstrap_delta

    tuned, base = [0.9, 0.8, 1.0, 0.7] * 10, [0.1, 0.3, 0.0, 0.2] * 10
    delta = bootstrap_delta(tuned, base)
    assert delta["_lo"] < delta[""] < delta["_hi"] and delta["_lo"] > 0
    noise = bootstrap_delta([0.5, 0.6] * 10, [0.6, 0.5] * 10)
    assert noise["_lo"] < 0 < noise["_hi"]


def test_prompts_end_before_the_last_assistant_turn():
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    prompts, refs = split_prompts([conv])
    assert prompts == [conv[:3]] and refs == ["d"]

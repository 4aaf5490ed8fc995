"""chrF through sacrebleu, as an `evaluate` module, in [0, 1]; per-sample scores on request."""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = "chrF (character n-gram F-score) of predictions vs references, in [0, 1]."
_KWARGS = """
predictions: list of generated strings.
references: list of reference strings (one per prediction).
per_sample: also return "chrf_per_sample", the sentence-level scores (default False).
Returns {"chrf": corpus chrF in [0, 1]}.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Popovic, M. (2015). chrF: character n-gram F-score for automatic MT "
                     "evaluation.",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, per_sample=False):
        result = {"chrf": sacrebleu.corpus_chrf(predictions, [references]).score / 100}
        if per_sample:
            result["chrf_per_sample"] = [
                sacrebleu.sentence_chrf(p, [r]).score / 100
                for p, r in zip(predictions, references, strict=True)
            ]
        return result

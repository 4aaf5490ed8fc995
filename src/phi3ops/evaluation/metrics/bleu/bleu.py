"""Corpus BLEU through sacrebleu, as an `evaluate` module, scaled to [0, 1] like ROUGE."""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = "SacreBLEU corpus BLEU (13a tokenisation) of predictions vs references, in [0, 1]."
_KWARGS = """
predictions: list of generated strings.
references: list of reference strings (one per prediction).
per_sample: accepted for evaluate.combine; BLEU is a corpus statistic, so nothing is added.
Returns {"bleu": float in [0, 1]}.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, M. (2018). A Call for Clarity in Reporting BLEU Scores.",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, per_sample=False):
        return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score / 100}

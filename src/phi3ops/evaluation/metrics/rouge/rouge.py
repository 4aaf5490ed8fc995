"""ROUGE-1/2/L/Lsum F-measure through Google's rouge_score package, as an `evaluate` module."""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "ROUGE F-measure (rouge1, rouge2, rougeL, rougeLsum) of predictions vs references."
_KWARGS = """
predictions: list of generated strings.
references: list of reference strings.
use_stemmer: apply the Porter stemmer before matching (default False).
per_sample: also return "<type>_per_sample" lists of per-pair F-measures (default False).
Returns a dict of aggregated F-measures, each in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=False,
                 per_sample=False):
        rouge_types = rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"]
        scorer = rouge_scorer.RougeScorer(rouge_types=rouge_types, use_stemmer=use_stemmer)
        pairs = zip(references, predictions, strict=True)
        scores = [scorer.score(ref, pred) for ref, pred in pairs]
        result = {}
        for key in rouge_types:
            values = [s[key].fmeasure for s in scores]
            # Plain mean of per-sample F-measures: deterministic, unlike a bootstrap midpoint.
            result[key] = float(sum(values) / max(len(values), 1))
            if per_sample:
                result[f"{key}_per_sample"] = values
        return result

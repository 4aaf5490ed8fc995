"""Exact match after light normalisation (case, surrounding whitespace), as an `evaluate` module."""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to their reference after normalisation."
_KWARGS = """
predictions: list of generated strings.
references: list of reference strings.
ignore_case: compare case-insensitively (default True).
per_sample: also return "exact_match_per_sample", 1.0 or 0.0 per pair (default False).
Returns {"exact_match": float in [0, 1]}.
"""


def _normalise(text: str, ignore_case: bool) -> str:
    text = " ".join(text.split())
    return text.lower() if ignore_case else text


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, ignore_case=True, per_sample=False):
        hits = [
            float(_normalise(p, ignore_case) == _normalise(r, ignore_case))
            for p, r in zip(predictions, references, strict=True)
        ]
        result = {"exact_match": sum(hits) / max(len(hits), 1)}
        if per_sample:
            result["exact_match_per_sample"] = hits
        return result

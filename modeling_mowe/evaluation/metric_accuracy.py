"""Exact-match accuracy on strings as a local ``evaluate`` module, loadable by file path offline.

The Hub's ``accuracy`` script takes integer class ids; the benchmark's answers are words, so this one compares
strings. It does not normalise them: call ``modeling_mowe.evaluation.normalize_answer`` first.
"""

import datasets
import evaluate

_DESCRIPTION = """\
Accuracy: the fraction of predictions equal to their reference string (exact match, after whatever
normalisation the caller applied). Higher is better; in [0, 1].
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): predicted answers.
    references (list of str): reference answers, one per prediction.
Returns:
    accuracy (float): correct / total.
    correct (int), total (int).
Examples:
    >>> accuracy = evaluate.load("metric_accuracy.py")
    >>> accuracy.compute(predictions=["male", "female"], references=["male", "male"])["accuracy"]
    0.5
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions=None, references=None):
        if not references:
            raise ValueError("Accuracy needs at least one (prediction, reference) pair.")
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references), "correct": correct, "total": len(references)}

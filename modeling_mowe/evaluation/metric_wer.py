"""Word error rate as a local ``evaluate`` module (the Hub's ``wer`` script, loadable by file path offline).

Load it with ``evaluate.load("/abs/path/to/metric_wer.py")`` or :func:`modeling_mowe.evaluation.load_metric`.
"""

import datasets
import evaluate
import jiwer

_CITATION = """\
@inproceedings{morris2004,
  author = {Morris, Andrew and Maier, Viktoria and Green, Phil},
  year = {2004},
  title = {From WER and RIL to MER and WIL: improved evaluation measures for connected speech recognition.}
}
"""

_DESCRIPTION = """\
Word error rate (WER) of predicted transcripts against references, computed with jiwer over the whole corpus:
WER = (S + D + I) / N, with S substitutions, D deletions, I insertions and N the number of reference words summed
over all pairs (not a mean of per-pair rates). The strings are compared as given: normalise them first (see
modeling_mowe.evaluation.normalize_answer). Lower is better; it can exceed 1 when predictions insert many words.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): transcripts to score.
    references (list of str): the reference transcripts, one per prediction, each with at least one word.
Returns:
    wer (float): corpus-level word error rate.
    substitutions, deletions, insertions, hits (int): the alignment counts.
    num_reference_words (int): N, the denominator.
Examples:
    >>> wer = evaluate.load("metric_wer.py")
    >>> wer.compute(predictions=["the cat sat"], references=["the cat sat down"])["wer"]
    0.25
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Wer(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/jitsi/jiwer/"],
            reference_urls=["https://en.wikipedia.org/wiki/Word_error_rate"],
        )

    def _compute(self, predictions=None, references=None):
        predictions = ["" if p is None else str(p) for p in predictions]
        references = ["" if r is None else str(r) for r in references]
        if not references:
            raise ValueError("WER needs at least one (prediction, reference) pair.")
        empty = [i for i, r in enumerate(references) if not r.split()]
        if empty:
            raise ValueError(f"WER is undefined for empty references (indices {empty[:10]}); drop or fix them.")
        out = jiwer.process_words(references, predictions)
        counts = {
            "substitutions": int(out.substitutions),
            "deletions": int(out.deletions),
            "insertions": int(out.insertions),
            "hits": int(out.hits),
        }
        total = counts["substitutions"] + counts["deletions"] + counts["hits"]
        errors = counts["substitutions"] + counts["deletions"] + counts["insertions"]
        return {"wer": errors / total, **counts, "num_reference_words": total}

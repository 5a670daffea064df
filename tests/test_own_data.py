"""The goal of "Train on your own data": from a LibriSpeech-style tree and a folder per emotion to a trained and
evaluated model with the README's two commands and one mixture file, no Python written; and the benchmark of
streamed training (memory, adapter overhead) at a tiny size."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from local_corpora import write_label_folders, write_librispeech

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Train on your own data"


def own_data_commands() -> list[str]:
    """The command lines of the README's "Train on your own data" section, continuations joined."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line.strip() for block in blocks for line in re.sub(r"\\\n\s*", "", block).splitlines()
            if line.strip().startswith("python")]


def test_the_readme_documents_training_and_evaluating_on_a_mixture():
    train, evaluate = own_data_commands()
    assert "examples/train_sft.py --mixture examples/mixtures/local.yaml" in train
    assert "examples/evaluate_model.py" in evaluate
    assert "--mixture examples/mixtures/local.yaml --split test" in evaluate
    assert "docs/DATA.md" in (ROOT / "README.md").read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]


def test_two_documented_commands_train_and_evaluate_on_local_trees(tmp_path):
    for name in ("examples", "hub_configs"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    write_librispeech(tmp_path / "data" / "LibriSpeech", {"train-clean-100": (2, 4), "test-clean": (1, 2)})
    write_label_folders(tmp_path / "data" / "emotions", {"angry": 5, "happy": 5, "sad": 5})
    env = {
        **os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules_cache"), "OMP_NUM_THREADS": "1",
    }
    train, evaluate = own_data_commands()
    for command in (train, evaluate):
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stderr[-4000:]}"
    assert (tmp_path / "out" / "mixture" / "model.safetensors").is_file()
    results = json.loads((tmp_path / "out" / "mixture-eval" / "results.json").read_text())
    (scores,) = results.values()
    assert {task: (r["metric"], r["n"]) for task, r in scores["tasks"].items()} == {
        "asr": ("wer", 2),  # test-clean
        "emotion": ("accuracy", 3),  # held_out 0.2 of 15 clips
    }
    assert len(scores["predictions"]) == 5


def test_bench_adapters_runs_at_a_tiny_size():
    import bench_adapters

    result = bench_adapters.main(["--rows", "16", "--rounds", "1", "--batch-size", "4"])
    assert result["rows_trained"] == 16 and len(result["rss_mb_every_step"]) == 4
    assert 0 < result["rss_mb_start"] <= result["rss_mb_peak"] and result["rss_mb_end"] <= result["rss_mb_peak"]
    assert result["overhead_ratio"] == pytest.approx(result["step_ms_adapted"] / result["step_ms_preconverted"],
                                                     rel=1e-3)
    assert result["data_ms_per_batch_adapted"] > 0 and result["data_ms_per_batch_preconverted"] > 0

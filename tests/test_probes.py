"""The probe benchmarks, run at a tiny size: every benchmark must run, and its figures must have the right form."""

from __future__ import annotations

import json

import probe_frozen_features
from conftest import tiny_whisper
from test_specialize import tiny_hubert


def test_frozen_feature_probe_runs_on_any_encoder_folder(tmp_path, capsys):
    tiny_whisper(num_mel_bins=80, d_model=16).save_pretrained(tmp_path / "whisper")
    tiny_hubert().save_pretrained(tmp_path / "hubert")
    summary = probe_frozen_features.main([
        "--encoders", str(tmp_path / "whisper"), str(tmp_path / "hubert"), "--tasks", "gender", "--padded",
        "--train-per-task", "6", "--test-per-task", "4", "--finetune-steps", "1",
        "--finetune-encoder", str(tmp_path / "whisper"), "--cache-dir", str(tmp_path / "bench"),
        "--output", str(tmp_path / "probe.json"),
    ])  # fmt: skip
    accuracy = summary["accuracy"]["gender"]
    expected = {f"{tmp_path / e} frozen, {m}" for e in ("whisper", "hubert") for m in ("dynamic", "padded")}
    assert expected | {f"{tmp_path / 'whisper'} fine-tuned 1 steps, dynamic"} == set(accuracy)
    # 4 held-out clips: every accuracy is a multiple of 1/4
    assert all(0 <= a <= 1 and (4 * a).is_integer() for a in accuracy.values()), accuracy
    assert json.loads((tmp_path / "probe.json").read_text())["accuracy"] == summary["accuracy"]
    assert "| gender |" in capsys.readouterr().out

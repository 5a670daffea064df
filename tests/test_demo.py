"""A smoke run of the demo pipeline on a tiny budget: every stage produces its artefact."""

from __future__ import annotations

import json
import shutil

import pytest

from modeling_mowe.cli import DemoSettings, run_demo


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (scripts/setup.sh)")
def test_demo_pipeline_produces_every_artefact(tmp_path, monkeypatch):
    from modeling_mowe.data import BenchmarkConfig

    settings = DemoSettings(
        output_dir=tmp_path, pretrain_steps=2, finetune_steps=2, batch_size=4,
        benchmark=BenchmarkConfig.tiny(),
    )
    summary = run_demo(settings)

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"MoWE", "base-only"}
    for system in results.values():
        assert set(system["tasks"]) == {"asr", "gender", "language", "rate", "count"}
        assert system["tasks"]["asr"]["metric"] == "wer"
    assert "| asr (WER" in (tmp_path / "results.md").read_text()

    model_dir = tmp_path / "mowe-model"
    for name in ("config.json", "model.safetensors", "modeling_mowe.py", "processor_config.json", "tokenizer.json"):
        assert (model_dir / name).exists(), name
    assert len(summary["examples"]) == 3
    assert all(set(e) == {"task", "question", "reference", "answer"} for e in summary["examples"])

    for plot in ("loss_curves.png", "routing_by_task.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    training = json.loads((tmp_path / "training.json").read_text())
    assert training["parameters"]["MoWE"]["trainable"] > training["parameters"]["base-only"]["trainable"]
    assert any("loss" in h for h in training["histories"]["MoWE"])

    # The pretrained base is cached: asking again trains nothing and returns the same weights.
    import torch

    from modeling_mowe import MoWEProcessor, training
    from modeling_mowe.cli import pretrain_base
    from modeling_mowe.data import build_benchmark

    def no_training(*args, **kwargs):
        raise AssertionError("the cached pretrained base was not reused")

    monkeypatch.setattr(training, "make_sft_trainer", no_training)
    splits = build_benchmark(tmp_path / "cache" / "benchmark", settings.benchmark, progress=False)
    again = pretrain_base(settings, MoWEProcessor.from_pretrained(settings.preset), splits["train"])
    assert set(again) == {"base_encoder", "language_model"}
    assert all(torch.isfinite(t).all() for t in again["base_encoder"].values())

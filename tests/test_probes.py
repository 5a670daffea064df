"""The probe benchmarks, run at a tiny size: every benchmark must run, and its figures must have the right form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import probe_frozen_features
import probe_stages
import pytest
import router_ceiling
from conftest import TINY, tiny_hubert, tiny_whisper


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


def test_frozen_feature_probe_trains_specialists_and_draws_who_knows_what(tmp_path, monkeypatch):
    """A `"<part>@<task>"` entry is specialised on the probe's own training rows of that task (never its held-out
    clips), cached under the cache folder's parent, probed like any encoder and drawn in the heatmap."""
    import datasets

    from modeling_mowe import convert
    from modeling_mowe.training import specialize

    monkeypatch.setenv(convert.CACHE_ENV, str(tmp_path / "converted"))
    seen, real = [], specialize.specialize

    def recording(args, training_args):
        seen.append((args.task, sorted(set(datasets.load_from_disk(args.dataset)["train"]["id"]))))
        return real(args, training_args)

    monkeypatch.setattr(specialize, "specialize", recording)
    arguments = [
        "--encoders", "whisper-tiny.en", "whisper-tiny.en@gender", "--tasks", "gender", "rate",
        "--train-per-task", "6", "--test-per-task", "4", "--specialist-steps", "1",
        "--cache-dir", str(tmp_path / "probe" / "bench"), "--output", str(tmp_path / "probe.json"),
        "--plot", str(tmp_path / "who-knows-what.png"),
    ]  # fmt: skip
    summary = probe_frozen_features.main(arguments)
    assert set(summary["accuracy"]) == {"gender", "rate"}
    for row in summary["accuracy"].values():
        assert set(row) == {"whisper-tiny.en frozen, dynamic", "whisper-tiny.en@gender frozen, dynamic"}
    (bench_folder,) = (tmp_path / "probe" / "bench").iterdir()
    bench = datasets.load_from_disk(str(bench_folder))
    gender_train = sorted(bench["train"].filter(lambda t: t == "gender", input_columns="task")["id"])
    assert seen == [("gender", gender_train)]
    folder = Path(summary["settings"]["folders"]["whisper-tiny.en@gender"])
    assert folder.parent == tmp_path / "probe" / "cache" and (folder / "model.safetensors").is_file()
    assert (tmp_path / "who-knows-what.png").read_bytes().startswith(b"\x89PNG")
    probe_frozen_features.main(arguments)  # the specialist is cached: a rerun trains nothing
    assert len(seen) == 1


@pytest.mark.parametrize("router_type", ["both", "none"])
def test_stage_probe_runs_on_a_saved_checkpoint(benchmark_dir, tmp_path, capsys, router_type):
    """A saved MoWE (4 weak encoders) and a base-only checkpoint: one column per stage, held-out accuracies."""
    from conftest import build_model

    from modeling_mowe import MoWEConfig, MoWEProcessor

    config = MoWEConfig.from_pretrained(TINY, router_type=router_type, dynamic_audio_length=True)
    build_model(config).save_pretrained(tmp_path / "model")
    MoWEProcessor.from_pretrained(TINY).save_pretrained(tmp_path / "model")
    summary = probe_stages.main([
        "--model", str(tmp_path / "model"), "--dataset", str(benchmark_dir), "--tasks", "gender", "rate",
        "--output", str(tmp_path / "stages.md"),
    ])  # fmt: skip
    weak = [f"weak {i}" for i in range(4)] if router_type == "both" else []
    for task in ("gender", "rate"):
        row = summary["accuracy"][task]
        assert list(row) == ["base", *weak, "audio tokens", "LLM"]
        assert all(0 <= a <= 1 and (2 * a).is_integer() for a in row.values()), row  # 2 held-out clips per task
    table = (tmp_path / "stages.md").read_text()
    assert "| task | base |" in table and "| rate |" in table and table in capsys.readouterr().out
    assert json.loads((tmp_path / "stages.json").read_text())["accuracy"] == summary["accuracy"]


def test_stage_probe_refuses_tasks_without_classes(benchmark_dir, tmp_path):
    from conftest import build_model

    from modeling_mowe import MoWEConfig, MoWEProcessor

    config = MoWEConfig.from_pretrained(TINY, router_type="none", dynamic_audio_length=True)
    model, processor = build_model(config), MoWEProcessor.from_pretrained(TINY)
    import datasets

    with pytest.raises(ValueError, match="'asr' has no class labels"):
        probe_stages.probe_stages(model, processor, datasets.load_from_disk(str(benchmark_dir)), ["asr"])


def test_router_ceiling_measures_how_well_the_routers_input_tells_the_tasks_apart(tmp_path, capsys):
    tiny_whisper(num_mel_bins=80, d_model=16).save_pretrained(tmp_path / "whisper")
    summary = router_ceiling.main([
        "--encoder", str(tmp_path / "whisper"), "--tasks", "asr", "gender", "emotion", "--train-per-task", "6",
        "--test-per-task", "4", "--cache-dir", str(tmp_path / "bench"), "--output", str(tmp_path / "ceiling.json"),
    ])  # fmt: skip
    recall = summary["recognised_as_own_task"]
    assert set(recall) == {"mean (the router's input)", "mean+std"}
    for row in recall.values():
        labels = {f"emotion: {label}" for label in ("angry", "happy", "neutral", "sad")}
        assert set(row) == {"asr", "gender", "emotion", *labels, "all clips"}
        # 4 held-out clips per task, one per emotion label, 12 in all
        assert all((4 * row[t]).is_integer() for t in ("asr", "gender", "emotion"))
        assert (12 * row["all clips"]).is_integer()
        assert all(row[label] in (0.0, 1.0) for label in labels)
        assert row["emotion"] == np.mean([row[label] for label in labels])
    assert json.loads((tmp_path / "ceiling.json").read_text())["recognised_as_own_task"] == recall
    assert "| mean (the router's input) |" in capsys.readouterr().out

"""The specialisation command: fine-tune an audio encoder with a pooled classification head on labelled rows and
save the encoder alone, ready for `from_components` (tiny random encoders, the tiny benchmark, a few steps)."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from conftest import SR, make_clip, tiny_hubert, tiny_whisper

from modeling_mowe import MoWEForConditionalGeneration, MoWEProcessor
from modeling_mowe.modeling_mowe import load_audio_encoder
from modeling_mowe.training import specialize


@pytest.mark.parametrize("family", ["whisper", "hubert"])
def test_specialised_encoder_is_saved_alone_and_joins_a_pool(benchmark_dir, tmp_path, tiny_llm, family):
    torch.manual_seed(0)
    source = tiny_whisper(num_mel_bins=80, d_model=16) if family == "whisper" else tiny_hubert()
    source.save_pretrained(tmp_path / "source")
    before = {k: v.clone() for k, v in load_audio_encoder(tmp_path / "source").state_dict().items()}
    out = tmp_path / "specialist"
    record = specialize.main([
        "--encoder", str(tmp_path / "source"), "--dataset", str(benchmark_dir), "--task", "gender",
        "--eval_split", "test", "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--report_to", "none", "--use_cpu", "True", "--save_strategy", "no", "--seed", "0",
    ])  # fmt: skip

    assert record["steps"] == 3 and record["labels"] == ["male", "female"]
    assert record["eval_rows"] == 2 and 0.0 <= record["eval_accuracy"] <= 1.0
    assert json.loads((out / specialize.RECORD_FILE).read_text())["task"] == "gender"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == (["WhisperEncoder"] if family == "whisper" else ["HubertModel"])
    assert (out / "preprocessor_config.json").exists() and (out / specialize.HEAD_FILE).exists()

    after = load_audio_encoder(out).state_dict()
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2, f"only {changed} changed"

    parts = dict(base_encoder=tmp_path / "source", weak_encoders=[out], text_model=tiny_llm)
    processor = MoWEProcessor.from_components(**parts, dynamic_audio_length=True)
    model = MoWEForConditionalGeneration.from_components(**parts, processor=processor, dynamic_audio_length=True)
    weak = model.model.audio_tower.weak_encoders[0].state_dict()
    for name, value in after.items():
        torch.testing.assert_close(weak[name], value, rtol=0, atol=0)
    inputs = processor(text=["<|audio|> hi"], audio=[make_clip(1.0)], sampling_rate=SR, return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model.eval()(**inputs).logits).all()


def test_pooling_ignores_padding_and_other_clips_in_the_batch():
    """A clip's pooled features are the same alone and next to a longer clip (valid frames only)."""
    encoder = load_audio_encoder(tiny_whisper(num_mel_bins=80, d_model=16)).eval()
    extractor = specialize.encoder_feature_extractor(encoder.config)
    short, long = make_clip(0.7, seed=1), make_clip(2.0, seed=2)
    with torch.no_grad():
        alone = specialize.pooled_features(
            encoder, encoder.config, **dict(extractor([short], sampling_rate=SR, return_tensors="pt"))
        )
        both = specialize.pooled_features(
            encoder, encoder.config, **dict(extractor([short, long], sampling_rate=SR, return_tensors="pt"))
        )
    assert alone.shape == (1, 32)
    torch.testing.assert_close(both[:1], alone, rtol=1e-4, atol=1e-5)


def test_a_users_own_dataset_with_a_label_column(tmp_path):
    """Not the benchmark: a dataset of raw audio arrays and a `speaker` column, saved with save_to_disk."""
    rows = {
        "audio": [{"array": make_clip(0.5, seed=i, kind="sine"), "sampling_rate": SR} for i in range(6)],
        "speaker": ["ann", "bob", "cy"] * 2,
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "data"))
    tiny_whisper(num_mel_bins=80, d_model=16).save_pretrained(tmp_path / "source")
    record = specialize.main([
        "--encoder", str(tmp_path / "source"), "--dataset", str(tmp_path / "data"), "--label_column", "speaker",
        "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--per_device_train_batch_size", "3",
        "--report_to", "none", "--use_cpu", "True", "--save_strategy", "no",
    ])  # fmt: skip
    assert record["labels"] == ["ann", "bob", "cy"] and record["steps"] == 1 and "eval_accuracy" not in record


def test_bad_datasets_say_what_to_fix(tmp_path):
    datasets.Dataset.from_dict({"audio": [np.zeros(10)], "label": ["a"]}).save_to_disk(str(tmp_path / "one"))
    args = specialize.SpecializeArguments(encoder="unused", dataset=str(tmp_path / "one"), label_column="emotion")
    with pytest.raises(ValueError, match=r"no column\(s\) \['emotion'\].*--label_column"):
        specialize.labelled_rows(args, "train")
    with pytest.raises(ValueError, match="at least 2 labels"):
        specialize.PooledAudioClassifier(load_audio_encoder(tiny_whisper(num_mel_bins=80, d_model=16)), 1)
    collator = specialize.AudioLabelCollator(
        specialize.encoder_feature_extractor(tiny_whisper(80, 16).config), ["a", "b"], "audio", "label"
    )
    with pytest.raises(ValueError, match=r"Labels \['zzz'\] are not among the classes \['a', 'b'\]"):
        collator([{"audio": {"array": make_clip(0.5), "sampling_rate": SR}, "label": "zzz"}])

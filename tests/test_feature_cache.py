"""The frozen-encoder feature cache: exact (padded and dynamic mode, re-batched clips, DDP; the base and a frozen weak
pool), keyed by clip and encoder, bounded memory with spill to disk, resumable, logged, and refused for a trainable
encoder."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_clip, make_inputs

from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration, MoWEProcessor
from modeling_mowe.training import freeze_for_training, make_sft_trainer
from modeling_mowe.training.feature_cache import (
    FrozenEncoderCache,
    FrozenFeatureCacheCallback,
    FrozenFeatureStore,
    encoder_fingerprint,
)

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Transcribe the audio. <|audio|>", "<|audio|> Is the speaker male or female?", "Which language? <|audio|>"]
CLIPS = [(1.1, 0), (1.9, 1), (0.8, 2)]


def frozen_model(dynamic: bool, seed: int = 0, train_weak_encoders: bool = True) -> MoWEForConditionalGeneration:
    torch.manual_seed(seed)
    model = MoWEForConditionalGeneration(MoWEConfig.from_pretrained(TINY, dynamic_audio_length=dynamic))
    freeze_for_training(model, train_language_model=True, train_weak_encoders=train_weak_encoders)
    return model.train()


def training_step(model, processor, texts, clips) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one step on `clips` (with their `texts`), with the same sampled routing every call."""
    inputs = make_inputs(processor, texts, clips)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model.zero_grad()
    torch.manual_seed(0)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def processor_for(model) -> MoWEProcessor:
    """The preset's processor with the model's feature extractor (short log-mels in dynamic mode)."""
    from modeling_mowe import MoWEFeatureExtractor

    processor = MoWEProcessor.from_pretrained(TINY)
    processor.feature_extractor = MoWEFeatureExtractor.from_mowe_config(model.config)
    return processor


@pytest.mark.parametrize("dynamic", [False, True], ids=["padded", "dynamic"])
def test_cached_step_equals_the_plain_encoder_on_rebatched_clips(dynamic):
    plain = frozen_model(dynamic)
    cached = copy.deepcopy(plain)
    cache = FrozenEncoderCache(cached, FrozenFeatureStore())
    processor = processor_for(plain)
    clips = [make_clip(seconds, seed=seed, kind="sine") for seconds, seed in CLIPS]
    training_step(cached, processor, TEXTS, clips)  # fills the cache
    assert (cache.store.hits, cache.store.misses, len(cache.store)) == (0, 3, 3)

    encoder_calls = []
    cached.get_encoder(modality="audio").base_encoder.layers[0].register_forward_hook(
        lambda *a: encoder_calls.append(1)
    )
    rebatched = [clips[2], clips[0]]  # other neighbours, another padded length
    loss, grads = training_step(cached, processor, TEXTS[:2], rebatched)
    expected_loss, expected_grads = training_step(plain, processor, TEXTS[:2], rebatched)
    assert (cache.store.hits, cache.store.misses) == (2, 3) and encoder_calls == []
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == expected_grads.keys() and any("weak_encoders" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dynamic", [False, True], ids=["padded", "dynamic"])
def test_a_frozen_weak_pool_is_cached_and_the_step_is_unchanged(dynamic):
    """Whisper and HuBERT weak encoders, frozen, served from the base's store: after one pass over the clips, a
    re-batched step calls no encoder and gives the uncached loss and gradients (weak projections and routers
    included); the weak encoders get no gradient."""
    plain = frozen_model(dynamic, train_weak_encoders=False)
    cached = copy.deepcopy(plain)
    store = FrozenFeatureStore()
    tower = cached.get_encoder(modality="audio")
    caches = [FrozenEncoderCache(cached, store)]
    caches += [FrozenEncoderCache(cached, store, i) for i in range(len(tower.weak_encoders))]
    processor = processor_for(plain)
    clips = [make_clip(seconds, seed=seed, kind="sine") for seconds, seed in CLIPS]
    inputs = make_inputs(processor, TEXTS, clips)
    for seed in range(16):  # sampled routing: every weak encoder sees every clip within a few passes
        torch.manual_seed(seed)
        with torch.no_grad():
            cached(**inputs)
    assert len(store) == 3 + 3 * len(tower.weak_encoders)

    encoder_calls = []
    for encoder in (tower.base_encoder, *tower.weak_encoders):
        for layer in list(encoder.modules())[1:]:  # the encoder's own call runs the cache; its layers, the encoder
            layer.register_forward_pre_hook(lambda *a: encoder_calls.append(1))
    rebatched = [clips[2], clips[0]]
    loss, grads = training_step(cached, processor, TEXTS[:2], rebatched)
    expected_loss, expected_grads = training_step(plain, processor, TEXTS[:2], rebatched)
    assert encoder_calls == []
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == expected_grads.keys()
    assert any("weak_projections" in n for n in grads) and not any("weak_encoders" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_new_weights_or_feature_settings_miss_the_cache():
    store = FrozenFeatureStore()
    clip = [make_clip(1.2, seed=0, kind="sine")]

    def misses_after_one_step(model) -> int:
        cache = FrozenEncoderCache(model, store)
        store.take_counts()
        with torch.no_grad():
            model(**make_inputs(processor_for(model), TEXTS[:1], clip))
        cache.remove()
        return store.take_counts()[1]

    assert misses_after_one_step(frozen_model(dynamic=False)) == 1
    assert misses_after_one_step(frozen_model(dynamic=False)) == 0  # same weights, same settings: a hit
    retrained = frozen_model(dynamic=False)
    with torch.no_grad():
        retrained.get_encoder(modality="audio").base_encoder.layer_norm.bias.add_(1e-3)
    assert misses_after_one_step(retrained) == 1
    assert misses_after_one_step(frozen_model(dynamic=True)) == 1
    assert len(store) == 3

    encoder = frozen_model(dynamic=False).get_encoder(modality="audio").base_encoder
    config = copy.deepcopy(encoder.config)
    config.num_mel_bins = 80
    assert encoder_fingerprint(encoder, config, False) != encoder_fingerprint(encoder, encoder.config, False)


def test_store_spills_to_disk_within_its_memory_limit_and_reopens(tmp_path):
    features = {f"clip{i}": torch.randn(50, 64) for i in range(10)}  # 12.8 kB each
    store = FrozenFeatureStore(tmp_path, max_memory_bytes=40_000)
    for key, value in features.items():
        store.put(key, value)
        assert store.memory_bytes <= 40_000
    store.flush()
    assert len(store) == 10 and store.disk_bytes > 10 * 12_800 and list(tmp_path.glob("*.safetensors"))
    reopened = FrozenFeatureStore(tmp_path, max_memory_bytes=0)
    assert reopened.memory_bytes == 0 and len(reopened) == 10
    for key, value in features.items():
        assert torch.equal(reopened.get(key), value)
    in_memory_only = FrozenFeatureStore(max_memory_bytes=40_000)
    for key, value in features.items():
        in_memory_only.put(key, value)
    assert in_memory_only.memory_bytes <= 40_000 and "clip9" in in_memory_only and "clip0" not in in_memory_only


@pytest.fixture(scope="module")
def rows(benchmark_dir):
    import datasets

    return datasets.load_from_disk(str(benchmark_dir))["train"].select(range(4))


def sft_args(output_dir, **overrides):
    from trl import SFTConfig

    defaults = dict(
        output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=2, learning_rate=3e-3, logging_steps=1,
        save_strategy="no", report_to="none", bf16=False, seed=0, data_seed=0, disable_tqdm=True,
        dataloader_pin_memory=False, lr_scheduler_type="constant", max_length=None,
    )
    return SFTConfig(**{**defaults, **overrides})


def cache_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "frozen_feature_cache/hits" in h]


def test_trainer_logs_counts_and_a_resumed_run_finds_the_spilled_features(rows, tmp_path):
    """Two epochs of 2 steps: the first misses every clip, the second hits; a run resumed from the step-2
    checkpoint finds all four clips on disk; its losses equal the uninterrupted run's."""
    processor = MoWEProcessor.from_pretrained(TINY)
    full = make_sft_trainer(frozen_model(False), processor, sft_args(tmp_path / "full"), rows)
    full.train()
    logs = cache_logs(full)
    hits_misses = [(h["frozen_feature_cache/hits"], h["frozen_feature_cache/misses"]) for h in logs]
    assert hits_misses == [(0, 2), (0, 2), (2, 0), (2, 0)]
    assert logs[-1]["frozen_feature_cache/memory_bytes"] > 0

    first = make_sft_trainer(
        frozen_model(False), processor, sft_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2),
        rows,
    )
    first.train()
    resumed = make_sft_trainer(frozen_model(False, seed=1), processor, sft_args(tmp_path / "run"), rows)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    logs = [h for h in cache_logs(resumed) if h["step"] > 2]  # the history before the checkpoint is the first run's
    assert [(h["frozen_feature_cache/hits"], h["frozen_feature_cache/misses"]) for h in logs] == [(2, 0), (2, 0)]
    assert logs[-1]["frozen_feature_cache/disk_bytes"] > 0
    full_losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    assert [h["loss"] for h in logs] == pytest.approx(full_losses[2:], abs=1e-5)


def test_make_sft_trainer_caches_a_frozen_weak_pool_and_not_a_trained_one(rows, tmp_path):
    processor = MoWEProcessor.from_pretrained(TINY)
    frozen = make_sft_trainer(frozen_model(False), processor, sft_args(tmp_path), rows, train_language_model=True,
                              train_weak_encoders=False)
    tower = frozen.model.get_encoder(modality="audio")
    assert not any(p.requires_grad for p in tower.weak_encoders.parameters())
    assert all(p.requires_grad for p in tower.weak_projections.parameters())
    callback = next(c for c in frozen.callback_handler.callbacks if isinstance(c, FrozenFeatureCacheCallback))
    assert [cache.encoder for cache in callback.caches] == [tower.base_encoder, *tower.weak_encoders]
    frozen.train()
    assert sum(h.get("frozen_feature_cache/misses", 0) for h in frozen.state.log_history) > 4  # weak clips too

    trained = make_sft_trainer(frozen_model(False), processor, sft_args(tmp_path), rows, train_language_model=True)
    callback = next(c for c in trained.callback_handler.callbacks if isinstance(c, FrozenFeatureCacheCallback))
    tower = trained.model.get_encoder(modality="audio")
    assert [cache.encoder for cache in callback.caches] == [tower.base_encoder]
    with pytest.raises(ValueError, match="weak encoder 0 .*train_weak_encoders=False"):
        FrozenEncoderCache(trained.model, FrozenFeatureStore(), 0)


def test_trainable_base_is_refused_and_not_cached_by_default(rows, tmp_path):
    processor = MoWEProcessor.from_pretrained(TINY)
    with pytest.raises(ValueError, match="trainable"):
        make_sft_trainer(frozen_model(False), processor, sft_args(tmp_path), rows, train_base_encoder=True,
                         cache_frozen_base=True)
    trainer = make_sft_trainer(frozen_model(False), processor, sft_args(tmp_path), rows, train_base_encoder=True)
    assert not any(type(c).__name__ == "FrozenFeatureCacheCallback" for c in trainer.callback_handler.callbacks)


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {examples!r})
import train_sft
from modeling_mowe.training import exit_distributed_process

cache, result = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
trainer = train_sft.main([*sys.argv[3:], "--output_dir", result + ".out", "--cache_frozen_base", cache])
flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters() if p.requires_grad])
hits = torch.tensor(sum(h.get("frozen_feature_cache/hits", 0) for h in trainer.state.log_history))
dist.all_reduce(hits)
if dist.get_rank() == 0:
    torch.save({{"world": dist.get_world_size(), "weights": flat, "hits": int(hits)}}, result)
exit_distributed_process()
"""


@pytest.mark.slow
def test_ddp_training_with_the_cache_equals_training_without(rows, tmp_path):
    """torchrun, 2 gloo ranks, 3 epochs of 4 clips (later ones partly from each rank's cache): the trained weights
    equal the uncached run's. One torchrun per arm, one Trainer per process, as `train_sft.py` runs."""
    import datasets

    datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "data"))
    script = tmp_path / "ddp_cache.py"
    script.write_text(DDP_SCRIPT.format(examples=str(ROOT / "examples")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    results = {}
    for cache in ("false", "true"):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
            cache, str(tmp_path / cache),
            "--dataset", str(tmp_path / "data"), "--max_steps", "6", "--per_device_train_batch_size", "1",
            "--learning_rate", "1e-3", "--bf16", "False", "--report_to", "none", "--save_strategy", "no",
            "--dataloader_pin_memory", "False", "--disable_tqdm", "True", "--logging_steps", "1", "--seed", "0",
        ]
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"stdout:\n{run.stdout[-2000:]}\nstderr:\n{run.stderr[-4000:]}"
        results[cache] = torch.load(tmp_path / cache)
    assert results["false"]["world"] == results["true"]["world"] == 2
    assert results["false"]["hits"] == 0 and results["true"]["hits"] > 0
    assert float((results["false"]["weights"] - results["true"]["weights"]).abs().max()) < 1e-5

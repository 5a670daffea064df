"""Frozen encoders' features, computed once per clip for a whole training run.

The paper's recipe freezes a large base encoder (Whisper-large-v3) and trains the weak pool, the projector and the
LLM (or LoRA) for several epochs over the same clips. A frozen encoder gives every clip the same features in every
epoch, so `FrozenEncoderCache` computes them on the clip's first visit and serves them from a `FrozenFeatureStore`
afterwards: the base's, and those of weak encoders kept frozen (`train_weak_encoders=False`: specialists). How it
stays exact: docs/ARCHITECTURE.md, "The frozen-base feature cache".

Tooling wing: imports the model code, never the other way round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.modeling_outputs import BaseModelOutput

from ..encoders import encoder_family

logger = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY_BYTES = 2 * 2**30
# Config attributes that make an audio encoder random in training mode (dropout, LayerDrop).
TRAIN_MODE_RANDOMNESS = (
    "dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "feat_proj_dropout", "encoder_layerdrop",
    "layerdrop",
)


class FrozenFeatureStore:
    """Features by key: in memory up to `max_memory_bytes`, then spilled to safetensors shards in `directory`.

    A store opened on a `directory` that holds shards finds their features (a resumed run, or another run of the
    same frozen encoder). `flush()` writes the features not yet on disk to a new shard; without a `directory` the
    oldest features are dropped instead once memory is full (and computed again when needed). Each shard has a
    unique name, so several processes (data-parallel ranks) may share a directory.

    Counts `hits` and `misses` (reset by `take_counts`), `memory_bytes` and `disk_bytes`.
    """

    def __init__(self, directory: str | os.PathLike | None = None, max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES):
        if max_memory_bytes < 0:
            raise ValueError(f"max_memory_bytes must be >= 0, got {max_memory_bytes}.")
        self.directory = Path(directory) if directory is not None else None
        self.max_memory_bytes = max_memory_bytes
        self.memory: dict[str, torch.Tensor] = {}
        self.unsaved: set[str] = set()
        self.on_disk: dict[str, Path] = {}
        self._open_shards: dict[Path, object] = {}
        self.memory_bytes = self.disk_bytes = 0
        self.hits = self.misses = 0
        if self.directory is not None and self.directory.is_dir():
            for shard in sorted(self.directory.glob("*.safetensors")):
                self._index_shard(shard)

    def __len__(self) -> int:
        return len(self.memory.keys() | self.on_disk.keys())

    def __contains__(self, key: str) -> bool:
        return key in self.memory or key in self.on_disk

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        shard = self.on_disk.get(key)
        if shard is None:
            return None
        if shard not in self._open_shards:
            from safetensors import safe_open

            self._open_shards[shard] = safe_open(str(shard), framework="pt")
        return self._open_shards[shard].get_tensor(key)

    def put(self, key: str, features: torch.Tensor) -> None:
        features = features.detach().to("cpu", copy=True).contiguous()
        self.memory[key] = features
        self.unsaved.add(key)
        self.memory_bytes += features.nbytes
        if self.memory_bytes > self.max_memory_bytes:
            self._make_room()

    def flush(self) -> Path | None:
        """Write the features not yet on disk to a new shard in `directory`; returns its path (None if nothing to
        write or no directory)."""
        if self.directory is None or not self.unsaved:
            return None
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        shard = self.directory / f"features-{uuid.uuid4().hex[:16]}.safetensors"
        partial = shard.with_suffix(".partial")
        save_file({key: self.memory[key] for key in sorted(self.unsaved)}, str(partial))
        os.replace(partial, shard)  # atomic: a reader never sees half a shard
        self.unsaved.clear()
        self._index_shard(shard)
        return shard

    def take_counts(self) -> tuple[int, int]:
        """`(hits, misses)` since the previous call."""
        counts = self.hits, self.misses
        self.hits = self.misses = 0
        return counts

    def _index_shard(self, shard: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                self.on_disk[key] = shard
        self.disk_bytes += shard.stat().st_size

    def _make_room(self) -> None:
        if self.directory is not None:
            self.flush()  # everything in memory is now on disk as well
            self.memory.clear()
            self.memory_bytes = 0
            return
        for key in list(self.memory):  # dicts keep insertion order: oldest first
            if self.memory_bytes <= self.max_memory_bytes:
                break
            self.memory_bytes -= self.memory.pop(key).nbytes
            self.unsaved.discard(key)


def train_mode_randomness(config) -> list[str]:
    """The settings of an encoder config that make its training-mode forward random (dropout, LayerDrop,
    SpecAugment); a cached frozen encoder runs in eval mode, which equals training mode only if this is empty."""
    found = [name for name in TRAIN_MODE_RANDOMNESS if getattr(config, name, 0) or 0]
    # Whisper's encoder never masks
    if getattr(config, "apply_spec_augment", False) and config.model_type != "whisper":
        found += [name for name in ("mask_time_prob", "mask_feature_prob") if getattr(config, name, 0) or 0]
    return found


def encoder_fingerprint(encoder: nn.Module, config, dynamic_audio_length: bool) -> str:
    """A digest of everything that decides a frozen encoder's output for given inputs: its config, the audio-length
    mode, and every weight (names, dtypes, shapes and values)."""
    digest = hashlib.blake2b(digest_size=16)
    settings = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    digest.update(json.dumps([settings, dynamic_audio_length], sort_keys=True, default=str).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tower_encoder(tower: nn.Module, weak_index: int | None = None) -> tuple[nn.Module, object]:
    """`(encoder, config)` of a MoWE audio tower's base encoder, or of its weak encoder `weak_index`."""
    if weak_index is None:
        return tower.base_encoder, tower.config.base_encoder_config
    return tower.weak_encoders[weak_index], tower.config.weak_encoder_configs[weak_index]


class FrozenEncoderCache:
    """Serves one frozen encoder of a MoWE tower (the base, or weak encoder `weak_index`) from a
    `FrozenFeatureStore`: each clip (window) is encoded once.

    Installed on the model in place (`remove()` undoes it): the encoder's `forward` is replaced for this instance
    only, so parameter names, `state_dict`, checkpoints, `save_pretrained` and DDP see the model unchanged. A clip's
    key is a digest of exactly the inputs the encoder reads for it (the whole window in padded mode; its real frames
    or samples where an `attention_mask` masks the padding) and of the encoder's fingerprint (config, audio-length
    mode, weights), so new weights or feature settings miss the cache. The store keeps each clip's valid frames only
    (for the base: those of the window's length; for a weak encoder: those its `attention_mask` gives, or every
    frame without one); padded frames come back as zeros, which nothing reads (the router pools and the projector
    stacks valid frames only; `align_to_frames` clamps to a weak encoder's valid frames). Misses run the encoder in
    eval mode, without gradients. The keys hold the fingerprint, so the base and the weak encoders (and several runs)
    may share one store.

    Raises `ValueError` if any parameter of the encoder is trainable.
    """

    def __init__(self, model: nn.Module, store: FrozenFeatureStore, weak_index: int | None = None):
        tower = model.get_encoder(modality="audio")
        encoder, config = tower_encoder(tower, weak_index)
        trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
        if trainable:
            which, fix = (("base encoder", "train_base_encoder=False") if weak_index is None
                          else (f"weak encoder {weak_index}", "train_weak_encoders=False"))
            raise ValueError(
                f"The {which} has {len(trainable)} trainable parameter tensors (e.g. {trainable[0]}), so its "
                f"features change every step and cannot be cached; freeze it ({fix}) or turn the cache off "
                "(cache_frozen_base=False)."
            )
        self.store = store
        self.tower, self.encoder, self.config = tower, encoder, config
        self.spec = encoder_family(config).frame_spec(config)
        self._fingerprint: str | None = None
        self._encoder_forward: Callable = encoder.forward
        self._window_lengths: torch.Tensor | None = None
        # The base sees every window, so the tower's `audio_lengths` give its valid frames in padded mode too.
        self._hook = (
            tower.register_forward_pre_hook(self._remember_window_lengths, with_kwargs=True)
            if weak_index is None else None
        )
        encoder.forward = self.forward

    @property
    def fingerprint(self) -> str:
        """The encoder's `encoder_fingerprint`, taken on first use after construction or `refresh()`."""
        if self._fingerprint is None:
            config = self.tower.config
            self._fingerprint = encoder_fingerprint(self.encoder, self.config, bool(config.dynamic_audio_length))
        return self._fingerprint

    def refresh(self) -> None:
        """Take the fingerprint again on next use: call after loading other weights into the base encoder (the
        callback does at the start of training, after the Trainer loaded a checkpoint to resume from)."""
        self._fingerprint = None

    def remove(self) -> None:
        """Give the encoder its own forward back (the store keeps its features)."""
        if self._hook is not None:
            self._hook.remove()
        del self.encoder.forward

    def _remember_window_lengths(self, tower, args, kwargs) -> None:
        self._window_lengths = args[2] if len(args) > 2 else kwargs.get("audio_lengths")

    def forward(self, *args, **kwargs) -> BaseModelOutput:
        """The encoder's forward (same arguments: `(batch, channels, time)` log-mels or `(batch, samples)` waveforms,
        optional `attention_mask` `(batch, time)`) -> `last_hidden_state` `(batch, frames, hidden)`."""
        inputs = args[0] if args else kwargs.get("input_features", kwargs.get("input_values"))
        lengths = self._window_lengths
        self._window_lengths = None
        if inputs is None or (self._hook is not None and (lengths is None or len(lengths) != len(inputs))):
            return self._encoder_forward(*args, **kwargs)  # not a call the cache can key (the base outside the tower)
        mask = kwargs.get("attention_mask")
        width = inputs.shape[-1]
        read = mask.sum(-1).tolist() if mask is not None else [width] * len(inputs)
        output_frames = self.spec.output_frames(width)  # `width` mel frames for Whisper, samples otherwise
        if lengths is not None:
            valid = self.spec.num_frames(lengths.cpu()).clamp(max=output_frames).tolist()
        else:  # the frames the read inputs give (a Whisper encoder: its mel frames; a waveform one: its samples)
            valid = [min(int(self.spec.output_frames(steps)), output_frames) for steps in read]
        keys = self._keys(inputs, read)

        cached = {i: self.store.get(key) for i, key in enumerate(keys)}
        missing = [i for i, features in cached.items() if features is None]
        self.store.hits += len(keys) - len(missing)
        self.store.misses += len(missing)
        if missing:
            for i, features in zip(missing, self._encode(missing, args, kwargs)):
                cached[i] = features[: valid[i]]
                self.store.put(keys[i], cached[i])
        first = cached[0]
        hidden = first.new_zeros(len(keys), output_frames, first.shape[-1], device=inputs.device)
        for i, features in cached.items():
            hidden[i, : len(features)] = features.to(inputs.device, non_blocking=True)
        return BaseModelOutput(last_hidden_state=hidden)

    def _keys(self, inputs: torch.Tensor, read: list[int]) -> list[str]:
        """One key per row: the fingerprint, the autocast state and the `read[i]` time steps the encoder reads."""
        device = inputs.device.type
        autocast = str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else "off"
        salt = f"{self.fingerprint}:{autocast}:{inputs.dtype}".encode()
        rows = inputs.detach().cpu()
        keys = []
        for row, steps in zip(rows, read):
            digest = hashlib.blake2b(salt, digest_size=16)
            seen = row[..., :steps].contiguous()
            digest.update(str(tuple(seen.shape)).encode())
            digest.update(seen.view(torch.uint8).numpy().tobytes())
            keys.append(digest.hexdigest())
        return keys

    def _encode(self, rows: list[int], args: tuple, kwargs: dict) -> torch.Tensor:
        """The encoder on the batch rows `rows` only, in eval mode and without gradients."""
        index = torch.tensor(rows, device=(args[0] if args else next(iter(kwargs.values()))).device)
        args = tuple(a[index] if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            with torch.no_grad():
                return self._encoder_forward(*args, **kwargs).last_hidden_state
        finally:
            self.encoder.train(was_training)


class FrozenFeatureCacheCallback(TrainerCallback):
    """Logs the caches' store's `frozen_feature_cache/hits` and `/misses` (since the previous log), `/memory_bytes`
    and `/disk_bytes`, and writes the features not yet on disk with every checkpoint (so a resumed run finds them)
    and at the end of training. `caches`: `FrozenEncoderCache`s sharing one store."""

    def __init__(self, caches: list[FrozenEncoderCache]):
        self.caches = caches
        self.store = caches[0].store

    def on_train_begin(self, args, state, control, **kwargs):
        for cache in self.caches:
            cache.refresh()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        store = self.store
        hits, misses = store.take_counts()
        stats = {
            "frozen_feature_cache/hits": hits,
            "frozen_feature_cache/misses": misses,
            "frozen_feature_cache/memory_bytes": store.memory_bytes,
            "frozen_feature_cache/disk_bytes": store.disk_bytes,
        }
        logs.update(stats)
        if state.log_history:
            state.log_history[-1].update(stats)

    def on_save(self, args, state, control, **kwargs):
        self.store.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.store.flush()


def cache_is_exact(model: nn.Module, weak_index: int | None = None) -> bool:
    """Whether caching `model`'s base encoder (or weak encoder `weak_index`) gives exactly the uncached training
    run: the encoder is frozen and its training-mode forward is not random (no dropout, LayerDrop or SpecAugment)."""
    encoder, config = tower_encoder(model.get_encoder(modality="audio"), weak_index)
    frozen = not any(p.requires_grad for p in encoder.parameters())
    return frozen and not train_mode_randomness(config)


def install_frozen_base_cache(
    trainer,
    cache_frozen_base: bool | FrozenFeatureStore | None = None,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
) -> list[FrozenEncoderCache]:
    """Serve `trainer.model`'s frozen base encoder from a feature cache, with every frozen weak encoder whose cache
    is exact (`cache_is_exact`: `train_weak_encoders=False`) in the same store, and log the store's counts; returns
    the `FrozenEncoderCache`s, base first (empty when off).

    `cache_frozen_base`: None (on where exact, see `cache_is_exact`), False (off), True (on; `ValueError` if the
    base is trainable; a base with dropout then runs without it), or a `FrozenFeatureStore` to use (e.g. one shared
    by several runs of the same frozen encoders). True and None use a store that keeps up to `max_memory_bytes`
    (default 2 GiB) in memory and spills the rest to `<output_dir>/_frozen_base_features`.
    """
    model = trainer.model
    if cache_frozen_base is False or (cache_frozen_base is None and not cache_is_exact(model)):
        return []
    store = cache_frozen_base
    if not isinstance(store, FrozenFeatureStore):
        store = FrozenFeatureStore(Path(trainer.args.output_dir) / "_frozen_base_features", max_memory_bytes)
    caches = [FrozenEncoderCache(model, store)]
    randomness = train_mode_randomness(caches[0].config)
    if randomness:
        logger.warning(
            "The cached base encoder runs in eval mode: "
            f"its training-mode randomness ({', '.join(randomness)}) is off."
        )
    weak_encoders = model.get_encoder(modality="audio").weak_encoders
    caches += [FrozenEncoderCache(model, store, i) for i in range(len(weak_encoders)) if cache_is_exact(model, i)]
    trainer.callback_handler.callbacks.insert(0, FrozenFeatureCacheCallback(caches))
    return caches


__all__ = [
    "FrozenEncoderCache",
    "FrozenFeatureCacheCallback",
    "FrozenFeatureStore",
    "cache_is_exact",
    "encoder_fingerprint",
    "install_frozen_base_cache",
    "train_mode_randomness",
]

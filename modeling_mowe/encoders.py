"""The audio encoder registry.

An encoder family is one entry in `ENCODER_FAMILIES`: how to build the encoder-only module from its HF config,
which front-end it reads, how many frames it emits for a clip length, and how to run it so that a clip's features
do not depend on what else is in the batch. Everything else (the tower, the processor) goes through this file.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig

SAMPLING_RATE = 16_000
WHISPER_HOP_LENGTH = 160  # samples per log-mel frame at 16 kHz
WHISPER_CHUNK_SECONDS = 30


def num_frames(num_samples: Any, spec: dict) -> Any:
    """Valid encoder frames for clips of `num_samples` samples; works on ints and integer tensors alike."""
    if spec["type"] == "whisper":
        mel_frames = num_samples // spec["hop_length"]
        frames = (mel_frames + 1) // 2  # conv2 has stride 2, padding 1, kernel 3
        if isinstance(frames, torch.Tensor):
            return frames.clamp(max=spec["max_frames"])
        return min(frames, spec["max_frames"])
    if spec["type"] == "conv":
        length = num_samples
        for kernel, stride in zip(spec["kernels"], spec["strides"]):
            length = (length - kernel) // stride + 1
        if isinstance(length, torch.Tensor):
            return length.clamp(min=0)
        return max(length, 0)
    raise ValueError(f"Unknown frame spec type {spec['type']!r}.")


def n_audio_tokens(num_samples: Any, spec: dict, stack_factor: int) -> Any:
    """Audio tokens one clip (or window) of `num_samples` becomes: its valid base frames, `stack_factor` per token.

    The processor expands each `<|audio|>` placeholder with this and the model keeps this many tokens per window,
    so the two can never disagree.
    """
    frames = num_frames(num_samples, spec)
    return -(-frames // stack_factor)


def whisper_frame_spec(max_frames: int = 1500) -> dict:
    """Whisper's frame spec: 160-sample mel hop, conv stride 2 (50 frames/s), `max_frames` per 30 s window."""
    return {
        "type": "whisper",
        "hop_length": WHISPER_HOP_LENGTH,
        "max_frames": max_frames,
        "samples_per_frame": 2 * WHISPER_HOP_LENGTH,
    }


def min_samples(spec: dict) -> int:
    """The shortest clip (in samples) that gives at least one frame."""
    if spec["type"] == "whisper":
        return spec["hop_length"]
    return spec["receptive_field"]


class WhisperEncoderFamily:
    """Whisper's encoder: log-mel input (n_mels from the config), 50 frames/s, every clip padded to 30 s."""

    model_types = ("whisper",)
    frozen_in_training: tuple[str, ...] = ()

    @staticmethod
    def front_end(config: PretrainedConfig) -> dict:
        return {"kind": "log_mel", "n_mels": config.num_mel_bins}

    @staticmethod
    def frame_spec(config: PretrainedConfig) -> dict:
        return whisper_frame_spec(config.max_source_positions)

    @staticmethod
    def hidden_size(config: PretrainedConfig) -> int:
        return config.d_model

    @staticmethod
    def build(config: PretrainedConfig) -> nn.Module:
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder(config)

    @staticmethod
    def from_pretrained_model(model: nn.Module) -> nn.Module:
        return model.get_encoder() if hasattr(model, "get_encoder") else model

    @staticmethod
    def encode(
        encoder: nn.Module, features: torch.Tensor, lengths: torch.Tensor, dynamic: bool = False
    ) -> torch.Tensor:
        """Encode log-mel `features` [b, n_mels, 3000] of clips of `lengths` samples [b] -> [b, T, d_model].

        `dynamic=False` runs the stock encoder on the full 30 s (T = 1500), as Whisper was trained. `dynamic=True`
        keeps only the batch's longest clip (T = its frames), slices the positional embeddings and masks every
        clip's padded frames in attention, so each clip's features match the clip encoded alone.
        """
        if not dynamic:
            return encoder(input_features=features).last_hidden_state
        mel_lengths = (lengths // WHISPER_HOP_LENGTH).clamp(max=features.shape[-1])
        frame_lengths = (mel_lengths + 1) // 2
        frames = int(frame_lengths.max())
        mel = features[..., : 2 * frames]
        mel_valid = torch.arange(mel.shape[-1], device=mel.device)[None, :] < mel_lengths[:, None]
        mel = mel * mel_valid[:, None, :].to(mel.dtype)
        hidden = nn.functional.gelu(encoder.conv1(mel))
        hidden = nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
        # Called, not `.weight` read: an offloaded embedding (`device_map` with disk/CPU offload) loads on call.
        hidden = hidden + encoder.embed_positions(torch.arange(frames, device=hidden.device)).to(hidden.dtype)
        hidden = nn.functional.dropout(hidden, p=encoder.dropout, training=encoder.training)
        frame_valid = torch.arange(frames, device=hidden.device)[None, :] < frame_lengths[:, None]
        attention_mask = torch.zeros(frame_valid.shape, dtype=hidden.dtype, device=hidden.device)
        attention_mask = attention_mask.masked_fill(~frame_valid, torch.finfo(hidden.dtype).min)[:, None, None, :]
        for layer in encoder.layers:
            hidden = layer(hidden, attention_mask)
        return encoder.layer_norm(hidden)


class WaveformEncoderFamily:
    """HuBERT, wav2vec2, WavLM, data2vec-audio: the base model without a head, on the normalised waveform.

    Runs batched with an attention mask. The group-norm feature encoders (HuBERT-base, wav2vec2-base) normalise
    their first conv layer's output over time, padding included, so zero padding would change every frame: for
    those, that GroupNorm's statistics are taken over each clip's own frames only (`MaskedGroupNorm`).
    """

    model_types = ("hubert", "wav2vec2", "wavlm", "data2vec-audio")
    # The conv feature encoder stays frozen when fine-tuning, as in wav2vec2/HuBERT recipes (`freeze_feature_encoder`):
    # its backward over raw 16 kHz samples costs more than the rest of a small encoder.
    frozen_in_training: tuple[str, ...] = ("feature_extractor",)

    @staticmethod
    def front_end(config: PretrainedConfig) -> dict:
        return {"kind": "waveform"}

    @staticmethod
    def frame_spec(config: PretrainedConfig) -> dict:
        kernels, strides = list(config.conv_kernel), list(config.conv_stride)
        receptive_field = 1
        for kernel, stride in zip(reversed(kernels), reversed(strides)):
            receptive_field = (receptive_field - 1) * stride + kernel
        return {
            "type": "conv",
            "kernels": kernels,
            "strides": strides,
            "samples_per_frame": math.prod(strides),
            "receptive_field": receptive_field,
        }

    @staticmethod
    def hidden_size(config: PretrainedConfig) -> int:
        return config.hidden_size

    @staticmethod
    def build(config: PretrainedConfig) -> nn.Module:
        return WaveformEncoderFamily.from_pretrained_model(AutoModel.from_config(config))

    @staticmethod
    def from_pretrained_model(model: nn.Module) -> nn.Module:
        first_conv = model.feature_extractor.conv_layers[0]
        if isinstance(getattr(first_conv, "layer_norm", None), nn.GroupNorm):
            _use_masked_group_norm(first_conv)
        return model

    @staticmethod
    def encode(
        encoder: nn.Module, waveform: torch.Tensor, lengths: torch.Tensor, dynamic: bool = False
    ) -> torch.Tensor:
        """Encode the normalised 16 kHz `waveform` [b, S] of clips of `lengths` samples [b] -> [b, T, hidden_size]."""
        valid = torch.arange(waveform.shape[-1], device=waveform.device)[None, :] < lengths[:, None]
        first_conv = encoder.feature_extractor.conv_layers[0]
        if isinstance(getattr(first_conv, "layer_norm", None), nn.GroupNorm):
            norm = _use_masked_group_norm(first_conv)
            norm.frame_lengths = (lengths - first_conv.conv.kernel_size[0]) // first_conv.conv.stride[0] + 1
        return encoder(waveform, attention_mask=valid.long()).last_hidden_state


class MaskedGroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` over [b, C, T] whose statistics cover each row's first `frame_lengths[b]` frames only.

    `WaveformEncoderFamily.encode` sets `frame_lengths` before each call; the value stays until the next call, so a
    gradient-checkpointing recomputation of the same batch sees it too. Inputs of another shape get plain GroupNorm.
    """

    frame_lengths: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        lengths = self.frame_lengths
        if lengths is None or lengths.shape[0] != hidden.shape[0] or int(lengths.max()) != hidden.shape[-1]:
            return super().forward(hidden)
        batch, channels, frames = hidden.shape
        grouped = hidden.reshape(batch, self.num_groups, -1, frames)
        mask = (torch.arange(frames, device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
        mask = mask[:, None, None]
        count = mask.sum(-1, keepdim=True) * grouped.shape[2]
        mean = (grouped * mask).sum((-1, -2), keepdim=True) / count
        var = (((grouped - mean) * mask) ** 2).sum((-1, -2), keepdim=True) / count
        normed = ((grouped - mean) / torch.sqrt(var + self.eps)).reshape(batch, channels, frames)
        if self.affine:
            normed = normed * self.weight[None, :, None] + self.bias[None, :, None]
        return normed


def _use_masked_group_norm(conv_layer: nn.Module) -> MaskedGroupNorm:
    """Swap the conv layer's GroupNorm for a `MaskedGroupNorm` sharing its parameters (once)."""
    norm = conv_layer.layer_norm
    if not isinstance(norm, MaskedGroupNorm):
        masked = MaskedGroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine, device="meta")
        if norm.affine:
            masked.weight, masked.bias = norm.weight, norm.bias
        conv_layer.layer_norm = norm = masked
    return norm


ENCODER_FAMILIES: dict[str, type] = {
    model_type: family
    for family in (WhisperEncoderFamily, WaveformEncoderFamily)
    for model_type in family.model_types
}


def encoder_family(config: PretrainedConfig, what: str = "encoder config"):
    """The registry entry for `config`, or a `ValueError` listing the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ENCODER_FAMILIES:
        raise ValueError(
            f"{what} has model_type={model_type!r}, which is not a supported audio encoder family; "
            f"supported: {sorted(ENCODER_FAMILIES)}. Add an entry to ENCODER_FAMILIES in encoders.py to support it."
        )
    return ENCODER_FAMILIES[model_type]


def frame_spec(config: PretrainedConfig) -> dict:
    return encoder_family(config).frame_spec(config)


def audio_front_ends(configs: list[PretrainedConfig]) -> list[dict]:
    """Distinct front-ends of `configs`, each once, in order of first use: log-mels first, then the waveform.

    The log-mels of all distinct sizes are stacked along the channel axis of `input_features` in this order.
    """
    front_ends: list[dict] = []
    for config in configs:
        front_end = encoder_family(config).front_end(config)
        if front_end not in front_ends:
            front_ends.append(front_end)
    return sorted(front_ends, key=lambda f: f["kind"] != "log_mel")


def mel_channel_offsets(front_ends: list[dict]) -> dict[int, int]:
    """First channel of each log-mel size inside the stacked `input_features`."""
    offsets, start = {}, 0
    for front_end in front_ends:
        if front_end["kind"] == "log_mel":
            offsets[front_end["n_mels"]] = start
            start += front_end["n_mels"]
    return offsets


def align_to_frames(
    hidden: torch.Tensor, weak_spec: dict, base_spec: dict, valid_frames: torch.Tensor, num_base_frames: int
) -> torch.Tensor:
    """Resample weak features [b, T_w, d] onto the base encoder's frame grid -> [b, T_b, d].

    Base frame t covers the same time as weak frame floor(t * base_stride / weak_stride) (nearest earlier frame),
    clamped to the clip's last valid weak frame, so padding never leaks into a clip's features.
    """
    ratio = base_spec["samples_per_frame"] / weak_spec["samples_per_frame"]
    index = (torch.arange(num_base_frames, device=hidden.device) * ratio).floor().long()
    index = torch.minimum(index[None, :], (valid_frames - 1).clamp(min=0)[:, None])
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))

"""The audio encoder registry.

An encoder family is one entry in `ENCODER_FAMILIES`: how to build the encoder-only module from its HF config,
which front-end it reads, how many frames it emits for a clip length, and how to run it so that a clip's features
do not depend on what else is in the batch. Everything else (the tower, the processor) goes through this file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import (
    Data2VecAudioModel,
    GradientCheckpointingLayer,
    HubertModel,
    PreTrainedConfig,
    Wav2Vec2Model,
    WavLMModel,
)
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import WhisperEncoder

# The decorator transformers' own encoders use to record `hidden_states` / `attentions`; it has no public alias.
from transformers.utils.output_capturing import capture_outputs

SAMPLING_RATE = 16_000
WHISPER_HOP_LENGTH = 160  # samples per log-mel frame at 16 kHz
WHISPER_CHUNK_SECONDS = 30


@dataclass(frozen=True)
class WhisperFrameSpec:
    """Whisper's frame grid: a log-mel frame every `hop_length` samples, halved by conv2 (stride 2), so 50 frames/s
    at 16 kHz, and at most `max_frames` (30 s) per window."""

    max_frames: int = 1500
    hop_length: int = WHISPER_HOP_LENGTH
    type: ClassVar[str] = "whisper"

    @property
    def samples_per_frame(self) -> int:
        return 2 * self.hop_length

    @property
    def min_samples(self) -> int:
        """The shortest clip (in samples) that gives a frame: one hop."""
        return self.hop_length

    def mel_frames(self, num_samples: Any) -> Any:
        """Log-mel frames that hold real audio in clips of `num_samples` samples (an int or an integer tensor)."""
        return num_samples // self.hop_length

    def num_frames(self, num_samples: Any) -> Any:
        """Valid frames of clips of `num_samples` samples (an int or an integer tensor)."""
        return self.output_frames(self.mel_frames(num_samples))

    def output_frames(self, mel_frames: Any) -> Any:
        """Frames the encoder emits for `mel_frames` log-mel frames (an int or an integer tensor): conv2 (kernel 3,
        stride 2, padding 1) halves them, rounding up; at most `max_frames`."""
        frames = (mel_frames + 1) // 2
        if isinstance(frames, torch.Tensor):
            return frames.clamp(max=self.max_frames)
        return min(frames, self.max_frames)

    def mel_frames_read(self, num_samples: int) -> int:
        """Log-mel frames a `dynamic_audio_length` encoder reads for windows of at most `num_samples` samples: their
        mel frames rounded up to an even count (conv2's stride), at most `2 * max_frames`."""
        return 2 * self.output_frames(self.mel_frames(num_samples))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class ConvFrameSpec:
    """The frame grid of a conv feature encoder (HuBERT, wav2vec2, ...): one frame per position of its stack of
    `kernels` and `strides` (no padding) over the 16 kHz samples."""

    kernels: tuple[int, ...]
    strides: tuple[int, ...]
    type: ClassVar[str] = "conv"

    def __post_init__(self):
        object.__setattr__(self, "kernels", tuple(self.kernels))
        object.__setattr__(self, "strides", tuple(self.strides))

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.strides)

    @property
    def min_samples(self) -> int:
        """The shortest clip (in samples) that gives a frame: the stack's receptive field."""
        receptive_field = 1
        for kernel, stride in zip(reversed(self.kernels), reversed(self.strides)):
            receptive_field = (receptive_field - 1) * stride + kernel
        return receptive_field

    def num_frames(self, num_samples: Any) -> Any:
        """Valid frames of clips of `num_samples` samples (an int or an integer tensor)."""
        length = num_samples
        for kernel, stride in zip(self.kernels, self.strides):
            length = (length - kernel) // stride + 1
        if isinstance(length, torch.Tensor):
            return length.clamp(min=0)
        return max(length, 0)

    def output_frames(self, num_samples: Any) -> Any:
        """Frames the encoder emits for inputs `num_samples` long: its input is the waveform itself."""
        return self.num_frames(num_samples)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "kernels": list(self.kernels), "strides": list(self.strides)}


FrameSpec = WhisperFrameSpec | ConvFrameSpec
FRAME_SPECS: dict[str, type] = {spec.type: spec for spec in (WhisperFrameSpec, ConvFrameSpec)}


def frame_spec_from_dict(values: dict[str, Any]) -> FrameSpec:
    """A frame spec from its `to_dict()` (as a processor config saves it); keys the spec does not have are ignored."""
    kind = values.get("type")
    if kind not in FRAME_SPECS:
        raise ValueError(f"Unknown frame spec type {kind!r}; known: {sorted(FRAME_SPECS)}.")
    spec = FRAME_SPECS[kind]
    return spec(**{field.name: values[field.name] for field in dataclasses.fields(spec) if field.name in values})


def num_audio_tokens(num_samples: Any, spec: FrameSpec, stack_factor: int) -> Any:
    """Audio tokens one clip (or window) of `num_samples` becomes: its valid base frames, `stack_factor` per token.

    The processor expands each `<|audio|>` placeholder with this and the model keeps this many tokens per window,
    so the two can never disagree.
    """
    frames = spec.num_frames(num_samples)
    return -(-frames // stack_factor)


class WhisperEncoderFamily:
    """Whisper's encoder: log-mel input (n_mels from the config), 50 frames/s, every clip padded to 30 s.

    An encoder with a shorter window (`max_source_positions` < 1500, e.g. Smart Turn's 400 = 8 s) hears the first
    `2 * max_source_positions` mel frames of each window; its frame spec stops there, and the frames after it take its
    last frame's features when aligned to the base grid (`align_to_frames`).
    """

    model_types = ("whisper",)
    # A folder whose config names this class holds the encoder alone (`WhisperEncoder.save_pretrained`): loaded with
    # `encoder_only_class`, not AutoModel (whose WhisperModel would leave the encoder's weights unread).
    encoder_only_architectures = ("WhisperEncoder",)

    @staticmethod
    def front_end(config: PreTrainedConfig) -> dict:
        return {"kind": "log_mel", "n_mels": config.num_mel_bins}

    @staticmethod
    def frame_spec(config: PreTrainedConfig) -> WhisperFrameSpec:
        return WhisperFrameSpec(max_frames=config.max_source_positions)

    @staticmethod
    def hidden_size(config: PreTrainedConfig) -> int:
        return config.d_model

    @staticmethod
    def build(config: PreTrainedConfig) -> nn.Module:
        return DynamicLengthWhisperEncoder(config)

    @staticmethod
    def encoder_only_class() -> type:
        return DynamicLengthWhisperEncoder

    @staticmethod
    def from_pretrained_model(model: nn.Module) -> nn.Module:
        encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
        if isinstance(encoder, DynamicLengthWhisperEncoder):
            return encoder
        return _rebuild_as(DynamicLengthWhisperEncoder, encoder)

    @staticmethod
    def encode(
        encoder: nn.Module, features: torch.Tensor, lengths: torch.Tensor, dynamic: bool = False, **kwargs
    ) -> BaseModelOutput:
        """Encode log-mel `features` [b, n_mels, 3000] of clips of `lengths` samples [b] -> `last_hidden_state`
        [b, T, d_model] (and `hidden_states`/`attentions` when `kwargs` ask for them).

        `dynamic=False` runs the stock encoder on the full 30 s (T = 1500), as Whisper was trained. `dynamic=True`
        runs on the mel frames given (T = half of them; a dynamic-length model's processor gives as many as the
        batch's longest window needs, `WhisperFrameSpec.mel_frames_read`) and masks every clip's padded frames, so
        each clip's features match the clip encoded alone. The width comes from `features.shape`, not from the
        lengths: no host sync.
        """
        features = features[..., : 2 * encoder.config.max_source_positions]  # a shorter window hears its first part
        if not dynamic:
            return encoder(input_features=features, **kwargs)
        mel_frames = features.shape[-1]
        mel_lengths = WhisperFrameSpec().mel_frames(lengths).clamp(max=mel_frames)
        mel_mask = torch.arange(mel_frames, device=features.device)[None, :] < mel_lengths[:, None]
        return encoder(input_features=features, attention_mask=mel_mask.long(), **kwargs)


class DynamicLengthWhisperEncoder(WhisperEncoder):
    """`WhisperEncoder` that also takes log-mels shorter than 30 s, and masks padded mel frames.

    The only differences from the stock forward: the positional embeddings are sliced to the input's frames (the
    stock encoder insists on 3000 mel frames), and `attention_mask` is used. The layers run through transformers'
    attention interface with a mask from its mask utilities, so every attention backend (eager, sdpa, flash, flex),
    layerdrop, gradient checkpointing and `output_hidden_states`/`output_attentions` work as in the stock encoder.
    On 3000 mel frames without a mask it computes exactly what `WhisperEncoder` does. Same weights, same keys.
    """

    @capture_outputs
    def forward(
        self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutput:
        """
        Args:
            input_features: `(batch, n_mels, mel_frames)` log-mels, `mel_frames <= 2 * max_source_positions`.
            attention_mask: `(batch, mel_frames)`, 1 for real mel frames, 0 for padding (zeroed before the convs).
        Returns:
            `last_hidden_state` `(batch, ceil(mel_frames / 2), d_model)`.
        """
        max_mel_frames = self.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        if input_features.shape[-1] > max_mel_frames:
            raise ValueError(
                f"Whisper takes at most {max_mel_frames} mel frames (30 s) per window, "
                f"got {input_features.shape[-1]}; split longer audio into 30 s windows (MoWEProcessor does)."
            )
        frame_mask = None
        if attention_mask is not None:
            input_features = input_features * attention_mask[:, None, :].to(input_features.dtype)
            frame_mask = attention_mask[:, :: self.conv2.stride[0]]
        hidden = nn.functional.gelu(self.conv1(input_features))
        hidden = nn.functional.gelu(self.conv2(hidden)).permute(0, 2, 1)
        # Called, not `.weight` read: an offloaded embedding (`device_map` with disk/CPU offload) loads on call.
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        hidden = hidden + self.embed_positions(positions).to(hidden.dtype)
        hidden = nn.functional.dropout(hidden, p=self.dropout, training=self.training)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=frame_mask)
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue  # LayerDrop, as the stock encoder
            hidden = layer(hidden, mask, **kwargs)
        return BaseModelOutput(last_hidden_state=self.layer_norm(hidden))


class WaveformEncoderFamily:
    """HuBERT, wav2vec2, WavLM, data2vec-audio: the base model without a head, on the normalised waveform.

    Runs batched with an attention mask. The group-norm feature encoders (HuBERT-base, wav2vec2-base) normalise
    their first conv layer's output over time, padding included, so zero padding would change every frame: the
    family builds the model class with `LengthAwareWaveformModel`'s forward, which normalises over each clip's own
    frames.
    """

    model_types = ("hubert", "wav2vec2", "wavlm", "data2vec-audio")  # the keys of LENGTH_AWARE_WAVEFORM_MODELS

    @staticmethod
    def front_end(config: PreTrainedConfig) -> dict:
        return {"kind": "waveform"}

    @staticmethod
    def frame_spec(config: PreTrainedConfig) -> ConvFrameSpec:
        return ConvFrameSpec(kernels=tuple(config.conv_kernel), strides=tuple(config.conv_stride))

    @staticmethod
    def hidden_size(config: PreTrainedConfig) -> int:
        return config.hidden_size

    @staticmethod
    def build(config: PreTrainedConfig) -> nn.Module:
        return LENGTH_AWARE_WAVEFORM_MODELS[config.model_type](config)

    @staticmethod
    def from_pretrained_model(model: nn.Module) -> nn.Module:
        if isinstance(model, LengthAwareWaveformModel):
            return model
        return _rebuild_as(LENGTH_AWARE_WAVEFORM_MODELS[model.config.model_type], model)

    @staticmethod
    def encode(
        encoder: nn.Module, waveform: torch.Tensor, lengths: torch.Tensor, dynamic: bool = False, **kwargs
    ) -> BaseModelOutput:
        """Encode the normalised 16 kHz `waveform` [b, S] of clips of `lengths` samples [b] -> `last_hidden_state`
        [b, T, hidden_size] (and `hidden_states`/`attentions` when `kwargs` ask for them)."""
        valid = torch.arange(waveform.shape[-1], device=waveform.device)[None, :] < lengths[:, None]
        return encoder(waveform, attention_mask=valid.long(), **kwargs)


class LengthAwareWaveformModel:
    """The forward of a waveform model class (`HubertModel`, `Wav2Vec2Model`, ...) it is mixed into, for zero-padded
    batches: a group-normed first conv layer (`feat_extract_norm="group"`) takes its statistics over each clip's own
    frames (`MaskedGroupNorm`, given the lengths by `conv_features`), so a clip's features do not depend on its batch.
    The lengths come from `attention_mask`, an argument. Otherwise the steps of the stock forward: same modules, same
    weights and keys, SpecAugment in training, hooks and `output_hidden_states` as usual.
    """

    def __init__(self, config: PreTrainedConfig):
        super().__init__(config)
        layers = self.feature_extractor.conv_layers
        for index, layer in enumerate(layers):
            if isinstance(getattr(layer, "layer_norm", None), nn.GroupNorm):
                layers[index] = MaskedGroupNormConvLayer(layer)

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutput:
        """
        Args:
            input_values: `(batch, samples)` normalised 16 kHz waveforms, zero-padded.
            attention_mask: `(batch, samples)`, 1 for real samples, 0 for padding; `None` when nothing is padded.
        Returns:
            `last_hidden_state` `(batch, frames, hidden_size)`, frames from the conv stack's output length.
        """
        if attention_mask is None:
            lengths = torch.full(input_values.shape[:1], input_values.shape[-1], device=input_values.device)
        else:
            lengths = attention_mask.sum(-1)
        features = conv_features(self.feature_extractor, input_values, lengths).transpose(1, 2)
        valid_frames = WaveformEncoderFamily.frame_spec(self.config).num_frames(lengths)
        frame_mask = torch.arange(features.shape[1], device=features.device)[None, :] < valid_frames[:, None]
        hidden = self.feature_projection(features)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # all but HuBERT also return the normed features
        # The stock forward's SpecAugment step (training only), a method of the class this forward extends: no
        # public function applies it.
        hidden = self._mask_hidden_states(hidden, attention_mask=frame_mask)
        hidden = self.encoder(hidden, attention_mask=frame_mask, **kwargs).last_hidden_state
        adapter = getattr(self, "adapter", None)
        return BaseModelOutput(last_hidden_state=hidden if adapter is None else adapter(hidden))


class LengthAwareHubertModel(LengthAwareWaveformModel, HubertModel):
    """`HubertModel` with `LengthAwareWaveformModel`'s forward."""


class LengthAwareWav2Vec2Model(LengthAwareWaveformModel, Wav2Vec2Model):
    """`Wav2Vec2Model` with `LengthAwareWaveformModel`'s forward."""


class LengthAwareWavLMModel(LengthAwareWaveformModel, WavLMModel):
    """`WavLMModel` with `LengthAwareWaveformModel`'s forward."""


class LengthAwareData2VecAudioModel(LengthAwareWaveformModel, Data2VecAudioModel):
    """`Data2VecAudioModel` with `LengthAwareWaveformModel`'s forward."""


# The classes `WaveformEncoderFamily` builds, by `model_type` (module-level: importable by name, as a class should be).
LENGTH_AWARE_WAVEFORM_MODELS: dict[str, type] = {
    "hubert": LengthAwareHubertModel,
    "wav2vec2": LengthAwareWav2Vec2Model,
    "wavlm": LengthAwareWavLMModel,
    "data2vec-audio": LengthAwareData2VecAudioModel,
}


def _rebuild_as(cls: type, model: nn.Module) -> nn.Module:
    """`model`'s parameters and buffers (shared, not copied) in a `cls` built from its config: cls must have the
    same module tree, as a subclass that changes only `forward`."""
    with torch.device("meta"):
        rebuilt = cls(model.config)
    rebuilt.load_state_dict(model.state_dict(), assign=True)
    return rebuilt.train(model.training)


def conv_features(feature_encoder: nn.Module, waveform: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Run a HuBERT/wav2vec2-style conv feature encoder on `waveform` [b, S] of clips of `lengths` samples [b]
    -> [b, C, T].

    As `feature_encoder.forward`, but a group-normed conv layer (`MaskedGroupNormConvLayer`, the first layer of a
    `feat_extract_norm="group"` stack) gets its frame lengths. Gradient checkpointing applies to every layer, as in
    the stock encoder (each is a `GradientCheckpointingLayer`); the lengths are arguments of the checkpointed call,
    so a recomputation sees its own batch's.
    """
    hidden = waveform[:, None]
    trainable = any(p.requires_grad for p in feature_encoder.parameters())
    if feature_encoder.training and trainable and not hidden.requires_grad:
        # As the stock encoder: a reentrant checkpoint of the first layer passes gradients only to an input that
        # requires them. Skipped for a frozen stack, whose backward down to the samples would be wasted work.
        hidden = hidden.detach().requires_grad_()
    for layer in feature_encoder.conv_layers:
        lengths = (lengths - layer.conv.kernel_size[0]) // layer.conv.stride[0] + 1
        hidden = layer(hidden, lengths) if isinstance(layer, MaskedGroupNormConvLayer) else layer(hidden)
    return hidden


class MaskedGroupNormConvLayer(GradientCheckpointingLayer):
    """A `*GroupNormConvLayer` (conv -> group norm -> activation) whose norm takes its statistics over each row's
    valid frames (`MaskedGroupNorm`). Made from the stock layer: the same submodules and keys, parameters shared."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.conv = layer.conv
        self.layer_norm = MaskedGroupNorm.sharing_parameters_of(layer.layer_norm)
        self.activation = layer.activation

    def forward(self, hidden: torch.Tensor, frame_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """`hidden` [b, C_in, S] -> [b, C_out, T]; `frame_lengths` [b]: valid output frames per row (None: all)."""
        return self.activation(self.layer_norm(self.conv(hidden), frame_lengths))


class MaskedGroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` over [b, C, T] whose statistics cover each row's first `frame_lengths[b]` frames only."""

    @classmethod
    def sharing_parameters_of(cls, norm: nn.GroupNorm) -> MaskedGroupNorm:
        masked = cls(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine, device="meta")
        if norm.affine:
            masked.weight, masked.bias = norm.weight, norm.bias
        return masked

    def forward(self, hidden: torch.Tensor, frame_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """`hidden` [b, C, T] normalised; `frame_lengths` [b] valid frames per row (`None`: all, as GroupNorm)."""
        if frame_lengths is None:
            return super().forward(hidden)
        batch, channels, frames = hidden.shape
        # Statistics in fp32, as `group_norm` runs under autocast: bf16 sums over thousands of frames drift.
        grouped = hidden.float().reshape(batch, self.num_groups, -1, frames)
        mask = (torch.arange(frames, device=hidden.device)[None, :] < frame_lengths[:, None]).float()[:, None, None]
        count = mask.sum(-1, keepdim=True) * grouped.shape[2]
        mean = (grouped * mask).sum((-1, -2), keepdim=True) / count
        var = (((grouped - mean) * mask) ** 2).sum((-1, -2), keepdim=True) / count
        normed = ((grouped - mean) / torch.sqrt(var + self.eps)).reshape(batch, channels, frames)
        if self.affine:
            normed = normed * self.weight.float()[None, :, None] + self.bias.float()[None, :, None]
        return normed.to(hidden.dtype)


ENCODER_FAMILIES: dict[str, type] = {
    model_type: family
    for family in (WhisperEncoderFamily, WaveformEncoderFamily)
    for model_type in family.model_types
}


def encoder_family(config: PreTrainedConfig, what: str = "encoder config"):
    """The registry entry for `config`, or a `ValueError` listing the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ENCODER_FAMILIES:
        raise ValueError(
            f"{what} has model_type={model_type!r}, which is not a supported audio encoder family; "
            f"supported: {sorted(ENCODER_FAMILIES)}. Add an entry to ENCODER_FAMILIES in encoders.py to support it."
        )
    return ENCODER_FAMILIES[model_type]


def frame_spec(config: PreTrainedConfig) -> FrameSpec:
    """How the frame count of the encoder of `config` follows the clip length."""
    return encoder_family(config).frame_spec(config)


def audio_front_ends(configs: list[PreTrainedConfig]) -> list[dict]:
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
    hidden: torch.Tensor,
    weak_spec: FrameSpec,
    base_spec: FrameSpec,
    valid_frames: torch.Tensor,
    num_base_frames: int,
) -> torch.Tensor:
    """Resample weak features [b, T_w, d] onto the base encoder's frame grid -> [b, T_b, d].

    Base frame t covers the same time as weak frame floor(t * base_stride / weak_stride) (nearest earlier frame),
    clamped to the clip's last valid weak frame, so padding never leaks into a clip's features.
    """
    ratio = base_spec.samples_per_frame / weak_spec.samples_per_frame
    index = (torch.arange(num_base_frames, device=hidden.device) * ratio).floor().long()
    index = torch.minimum(index[None, :], (valid_frames - 1).clamp(min=0)[:, None])
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))

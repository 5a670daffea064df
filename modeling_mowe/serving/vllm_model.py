"""MoWE as a native vLLM model: the MoWE audio tower and projector run as they do in transformers, the LLM is vLLM's.

vLLM imports this module (through [`modeling_mowe.serving.vllm_plugin.register`]) to serve folders whose config names
`MoWEForConditionalGeneration`. The audio side reuses this package's own `MoWEAudioTower` and `MoWEProjector`, so
routing stays sparse and the audio embeddings are the ones `generate()` sees; the causal LLM (`config.text_config`)
is built by vLLM (paged attention, continuous batching) and loads the checkpoint's `model.language_model.*` and
`lm_head.*` weights.

Audio items follow vLLM's audio path: each clip is resampled to 16 kHz (soxr, as the processor does) and downmixed,
then [`MoWEFeatureExtractor`] splits it into 30 s windows. The windows of one clip are one vLLM item
(`MultiModalFieldConfig.flat_from_sizes`), so clips of any length fit, and each `<|audio|>` in the prompt becomes
`MoWEProcessor.num_audio_tokens(clip)` audio tokens.

Tooling wing: needs vLLM, imports the remote-code wing, and no remote-code file imports it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors

from ..feature_extraction_mowe import MoWEFeatureExtractor, to_mono_waveform
from ..modeling_mowe import MoWEAudioTower, MoWEProjector

AUDIO_PLACEHOLDER = "<|audio|>"
# Longest dummy clip vLLM profiles with, in windows (as vLLM's Ultravox): it sizes the encoder cache, so longer clips
# are refused by vLLM with a message naming the limit.
MAX_PROFILED_WINDOWS = 16


class MoWEProcessingInfo(BaseProcessingInfo):
    """What vLLM needs to know about MoWE inputs: audio only (any number per prompt), resampled to 16 kHz mono."""

    def get_feature_extractor(self, **kwargs: object) -> MoWEFeatureExtractor:
        return self.get_hf_processor(**kwargs).feature_extractor

    def get_data_parser(self) -> MultiModalDataParser:
        return MultiModalDataParser(
            target_sr=self.get_feature_extractor().sampling_rate,
            target_channels=1,
            audio_resample_method="soxr",  # the processor's resampler; vLLM's default needs torchaudio
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"audio": None}

    def num_audio_tokens(self, num_samples: int) -> int:
        """Audio tokens a 16 kHz clip of `num_samples` samples becomes (the processor's count)."""
        return self.get_hf_processor().num_audio_tokens(num_samples)

    def max_profiled_samples(self, seq_len: int) -> int:
        """The longest clip vLLM profiles: whole windows whose tokens fit in `seq_len`, at most 16."""
        extractor = self.get_feature_extractor()
        window = extractor.chunk_length * extractor.sampling_rate
        windows = max(1, min(MAX_PROFILED_WINDOWS, (seq_len - 1) // self.num_audio_tokens(window)))
        return windows * window


class MoWEDummyInputsBuilder(BaseDummyInputsBuilder[MoWEProcessingInfo]):
    """Silent clips as long as vLLM may have to serve, for its memory profiling."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return AUDIO_PLACEHOLDER * mm_counts.get("audio", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any = None) -> dict:
        return {
            "audio": self._get_dummy_audios(
                length=self.info.max_profiled_samples(seq_len),
                num_audios=mm_counts.get("audio", 0),
                overrides=(mm_options or {}).get("audio"),
            )
        }


class MoWEMultiModalProcessor(BaseMultiModalProcessor[MoWEProcessingInfo]):
    """Clips -> MoWE features (one row per 30 s window, windows of a clip kept together); `<|audio|>` -> audio tokens.

    vLLM tokenises the prompt itself and then replaces each `<|audio|>` token with its clip's audio tokens, so only
    the feature extractor runs here, on clips vLLM has already resampled to its rate.
    """

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        extractor = self.info.get_feature_extractor()
        clips = [to_mono_waveform(np.asarray(clip), extractor.sampling_rate) for clip in hf_data["audio"]]
        features = extractor(clips, sampling_rate=extractor.sampling_rate, return_tensors="pt")
        features["audio_num_windows"] = torch.tensor([len(extractor.window_lengths(len(c))) for c in clips])
        features["audio_num_tokens"] = torch.tensor([self.info.num_audio_tokens(len(c)) for c in clips])
        return features

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        windows = hf_inputs.get("audio_num_windows", torch.zeros(0, dtype=torch.long))
        per_window = {
            name: MultiModalFieldConfig.flat_from_sizes("audio", windows)
            for name in ("input_features", "input_values", "audio_lengths")
            if name in hf_inputs
        }
        return dict(
            per_window,
            audio_num_windows=MultiModalFieldConfig.batched("audio", keep_on_cpu=True),
            audio_num_tokens=MultiModalFieldConfig.batched("audio", keep_on_cpu=True),
        )

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        audio_token_id = self.info.get_hf_config().audio_token_id
        num_tokens = out_mm_kwargs.get_data().get("audio_num_tokens", torch.zeros(0, dtype=torch.long))
        return [
            PromptReplacement(
                modality="audio",
                target=[audio_token_id],
                replacement=lambda item: [audio_token_id] * int(num_tokens[item]),
            )
        ]


def _padded_windows(value: torch.Tensor | list | None) -> torch.Tensor | None:
    """Per-window arrays as vLLM batches them (one tensor, or a list of per-clip tensors `(num_windows, ..., length)`
    when clips were padded to different lengths) -> one tensor, zero-padded on the last axis to the longest."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    parts = [_padded_windows(part) for part in value]
    longest = max(part.shape[-1] for part in parts)
    return torch.cat([nn.functional.pad(part, (0, longest - part.shape[-1])) for part in parts])


def _flat(value: torch.Tensor | list) -> torch.Tensor:
    """Per-window or per-clip numbers as vLLM batches them (a tensor or a list of them) -> one 1-D tensor."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)
    return torch.cat([_flat(part) for part in value])


@MULTIMODAL_REGISTRY.register_processor(
    MoWEMultiModalProcessor, info=MoWEProcessingInfo, dummy_inputs=MoWEDummyInputsBuilder
)
class MoWEForConditionalGenerationVLLM(nn.Module, SupportsMultiModal):
    """vLLM's `MoWEForConditionalGeneration`: MoWE's audio tower and projector, and vLLM's own causal LLM."""

    # transformers' checkpoint names -> this module's.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.audio_tower.": "audio_tower.",
            "model.multi_modal_projector.": "multi_modal_projector.",
            "model.language_model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("audio"):
            return AUDIO_PLACEHOLDER
        raise ValueError(f"MoWE models read audio and text only, not {modality}.")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.configure_mm_token_handling(config.text_config.vocab_size, [config.audio_token_id])
        with self._mark_tower_model(vllm_config, "audio"):
            self.audio_tower = MoWEAudioTower(config).eval()  # eval: no dropout, deterministic routing
            self.multi_modal_projector = MoWEProjector(config, self.audio_tower.output_size).eval()
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=_causal_lm_architectures(config.text_config),
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One `(num_audio_tokens, hidden_size)` tensor per clip, clips in prompt order."""
        lengths = kwargs.get("audio_lengths")
        if lengths is None:
            return []
        lengths = _flat(lengths).long()
        features, values = _padded_windows(kwargs.get("input_features")), _padded_windows(kwargs.get("input_values"))
        device = next(self.audio_tower.parameters()).device
        audio = self.audio_tower(
            None if features is None else features.to(device),
            None if values is None else values.to(device),
            lengths.to(device),
        )
        embeds = self.multi_modal_projector(audio.last_hidden_state, audio.valid_frames)
        num_tokens = _flat(kwargs["audio_num_tokens"]).tolist()
        return embeds.split(num_tokens)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


def _causal_lm_architectures(text_config) -> list[str]:
    """The LLM's vLLM architecture: the config's own, else `<Name>ForCausalLM` from its config class
    (`LlamaConfig` -> `LlamaForCausalLM`), as `MoWEConfig` keeps a bare text config."""
    if getattr(text_config, "architectures", None):
        return list(text_config.architectures)
    name = type(text_config).__name__.removesuffix("Config")
    if name.endswith("Text"):  # Gemma3TextConfig -> Gemma3ForCausalLM
        name = name.removesuffix("Text")
    return [f"{name}ForCausalLM"]

"""MoWE configuration: a base audio encoder, a pool of weak encoders, routers, a projector and a causal LLM."""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .encoders import audio_front_ends, encoder_family, frame_spec

ROUTER_TYPES = ("both", "data_dependent", "data_independent", "none")


def _as_config(value: Any, what: str) -> PretrainedConfig:
    """A sub-config given as a config object (copied: the caller's object is never changed) or as a dict carrying
    its `model_type`."""
    if isinstance(value, PretrainedConfig):
        return copy.deepcopy(value)
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"{what} is a dict without `model_type`; give a config object or add `model_type`.")
        return AutoConfig.for_model(model_type, **value)
    raise ValueError(f"{what} must be a transformers config or a dict, got {type(value).__name__}.")


class MoWEConfig(PretrainedConfig):
    r"""
    Configuration of [`MoWEForConditionalGeneration`]: an audio LLM with a Mixture of Weak Encoders
    (Zhang et al., arXiv 2409.06635).

    Args:
        base_encoder_config (`PretrainedConfig` or `dict`):
            Config of the strong base encoder (e.g. Whisper-large-v3's `WhisperConfig`). Always runs.
        weak_encoder_configs (`list` of `PretrainedConfig` or `dict`):
            Configs of the pool of light encoders (Whisper-tiny, HuBERT-base, ...). Families may differ.
        text_config (`PretrainedConfig` or `dict`):
            Config of any causal LLM loadable with `AutoModelForCausalLM`.
        router_type (`str`, defaults to `"both"`):
            `"data_independent"` (one learned choice for all inputs), `"data_dependent"` (chosen per clip from the
            base features), `"both"` (two blocks, concatenated) or `"none"` (the base-only ablation: no weak pool).
        router_top_k (`int`, defaults to 1):
            Weak encoders each router activates.
        router_aux_loss_coef (`float`, defaults to 0.1):
            Weight of the load-balancing loss of the data-dependent router (the paper's `L_MoWE` weight).
            Read at every forward, so a trainer may change it during training.
        weak_hidden_size (`int`, defaults to 256):
            Width `d_w` each weak encoder's features are projected to before the routers mix them.
        stack_factor (`int`, defaults to 4):
            Consecutive encoder frames stacked into one audio token (Whisper: 50 frames/s -> 12.5 tokens/s).
        projector_hidden_act (`str`, defaults to `"gelu"`):
            Activation between the projector's two linear layers.
        audio_token_id (`int`, *optional*):
            Id of the `<|audio|>` placeholder token; defaults to the LLM's vocabulary size (one appended token).
        dynamic_audio_length (`bool`, defaults to `False`):
            Encode only the batch's real audio length with Whisper encoders (slicing the positional embeddings,
            masking padded frames) instead of padding every clip to 30 s. Faster; pretrained Whisper only ever
            saw 30 s inputs, so the default keeps fidelity.
        component_checkpoints (`dict`, *optional*):
            Where the pretrained parts come from: `{"base_encoder": id, "weak_encoders": [ids], "text_model": id}`
            (set by `from_components`; the paper presets record them so the parts can be fetched).
    """

    model_type = "mowe"

    def __init__(
        self,
        base_encoder_config: PretrainedConfig | dict | None = None,
        weak_encoder_configs: list[PretrainedConfig | dict] | None = None,
        text_config: PretrainedConfig | dict | None = None,
        router_type: str = "both",
        router_top_k: int = 1,
        router_aux_loss_coef: float = 0.1,
        weak_hidden_size: int = 256,
        stack_factor: int = 4,
        projector_hidden_act: str = "gelu",
        audio_token_id: int | None = None,
        dynamic_audio_length: bool = False,
        component_checkpoints: dict | None = None,
        **kwargs,
    ):
        if base_encoder_config is None:
            base_encoder_config = {"model_type": "whisper"}
        if text_config is None:
            text_config = {"model_type": "llama"}
        self.base_encoder_config = _as_config(base_encoder_config, "base_encoder_config")
        self.weak_encoder_configs = [
            _as_config(c, f"weak_encoder_configs[{i}]") for i, c in enumerate(weak_encoder_configs or [])
        ]
        self.text_config = _as_config(text_config, "text_config")
        self.router_type = router_type
        self.router_top_k = router_top_k
        self.router_aux_loss_coef = router_aux_loss_coef
        self.weak_hidden_size = weak_hidden_size
        self.stack_factor = stack_factor
        self.projector_hidden_act = projector_hidden_act
        if audio_token_id is None:  # append one token to the LLM's vocabulary for <|audio|>
            audio_token_id = self.text_config.vocab_size
            self.text_config.vocab_size += 1
        self.audio_token_id = audio_token_id
        self.dynamic_audio_length = dynamic_audio_length
        self.component_checkpoints = component_checkpoints
        # Tie the LM head to the input embeddings exactly when the LLM does (transformers reads the top-level flag).
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
        self.validate_mowe()

    def validate_mowe(self) -> None:
        """Raise a `ValueError` naming the fix for any setting the model cannot be built from."""
        for name, cfg in [("base_encoder_config", self.base_encoder_config)] + [
            (f"weak_encoder_configs[{i}]", c) for i, c in enumerate(self.weak_encoder_configs)
        ]:
            encoder_family(cfg, what=name)  # raises for an unsupported family
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type={self.router_type!r} is not one of {ROUTER_TYPES}.")
        pool = len(self.weak_encoder_configs)
        if self.router_type != "none":
            if pool == 0:
                raise ValueError(
                    f"router_type={self.router_type!r} needs weak encoders, but weak_encoder_configs is empty; "
                    "add weak encoders or use router_type='none' (the base-only ablation)."
                )
            if not 1 <= self.router_top_k <= pool:
                raise ValueError(f"router_top_k={self.router_top_k} must be between 1 and the pool size ({pool}).")
        if not 0 <= self.audio_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"audio_token_id={self.audio_token_id} is outside the LLM's vocabulary "
                f"({self.text_config.vocab_size}); leave it unset to append one token."
            )
        if self.stack_factor < 1:
            raise ValueError(f"stack_factor={self.stack_factor} must be >= 1.")
        if self.weak_hidden_size < 1:
            raise ValueError(f"weak_hidden_size={self.weak_hidden_size} must be >= 1.")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef={self.router_aux_loss_coef} must be >= 0.")

    @property
    def _attn_implementation(self) -> str | None:
        return self._attn_implementation_internal

    @_attn_implementation.setter
    def _attn_implementation(self, value: str | dict | None) -> None:
        # transformers recurses only into declared sub-configs; MoWE's live in attributes and a list, so reach each
        # one here (`attn_implementation="eager"` in `from_pretrained` must reach the encoders and the LLM).
        PretrainedConfig._attn_implementation.fset(self, value)
        if value is None:
            return
        subs = {"base_encoder_config": self.base_encoder_config, "text_config": self.text_config}
        subs.update({f"weak_encoder_configs.{i}": c for i, c in enumerate(self.weak_encoder_configs)})
        for key, sub in subs.items():
            implementation = value.get(key, sub._attn_implementation) if isinstance(value, dict) else value
            sub._attn_implementation = implementation

    @property
    def active_routers(self) -> tuple[str, ...]:
        """Routers that run, in the order their feature blocks follow the base features."""
        return {
            "both": ("data_independent", "data_dependent"),
            "data_independent": ("data_independent",),
            "data_dependent": ("data_dependent",),
            "none": (),
        }[self.router_type]

    @property
    def encoder_configs(self) -> list[PretrainedConfig]:
        """The base encoder's config followed by the weak encoders' configs."""
        return [self.base_encoder_config, *self.weak_encoder_configs]

    @property
    def active_encoder_configs(self) -> list[PretrainedConfig]:
        """The encoders that run: the base encoder, and the weak pool unless `router_type="none"`."""
        return self.encoder_configs if self.active_routers else [self.base_encoder_config]

    @property
    def audio_front_ends(self) -> list[dict]:
        """The distinct front-ends (log-mel sizes, waveform) the encoders that run need, in input order."""
        return audio_front_ends(self.active_encoder_configs)

    @property
    def audio_frame_spec(self) -> dict:
        """How the base encoder's frame count follows the clip length (shared with the processor)."""
        return frame_spec(self.base_encoder_config)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["weak_encoder_configs"] = [_sub_config_dict(c) for c in self.weak_encoder_configs]
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        output = super().to_diff_dict()
        output["weak_encoder_configs"] = [_sub_config_dict(c) for c in self.weak_encoder_configs]
        return output


def _sub_config_dict(config: PretrainedConfig) -> dict[str, Any]:
    output = config.to_diff_dict()
    output["model_type"] = config.model_type
    output.pop("transformers_version", None)
    return output

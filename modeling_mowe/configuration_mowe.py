"""MoWE configuration: a base audio encoder, a pool of weak encoders, routers, a projector and a causal LLM."""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .encoders import audio_front_ends, encoder_family, frame_spec

ROUTER_TYPES = ("both", "data_dependent", "data_independent", "none")


def _as_config(value: Any, what: str, default_model_type: str | None = None) -> PretrainedConfig:
    """A sub-config given as a config object (copied: the caller's object is never changed) or as a dict carrying
    its `model_type` (or falling back to `default_model_type`)."""
    if isinstance(value, PretrainedConfig):
        return copy.deepcopy(value)
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", default_model_type)
        if model_type is None:
            raise ValueError(f"{what} is a dict without `model_type`; give a config object or add `model_type`.")
        return AutoConfig.for_model(model_type, **value)
    raise ValueError(f"{what} must be a transformers config or a dict, got {type(value).__name__}.")


WEAK_KEY = "weak_encoder_configs."


class _SubConfigKeys:
    """`MoWEConfig.sub_configs`: the declared `base_encoder_config` and `text_config` and, on an instance, one key
    per weak encoder (`"weak_encoder_configs.0"`, ...). transformers walks `config.sub_configs` to pass the attention
    implementation and dtype down (and its tests to set `output_hidden_states`/`output_attentions`), so listing the
    weak pool here is what makes those settings reach every weak encoder too."""

    def __get__(self, config: MoWEConfig | None, owner: type) -> dict[str, type]:
        keys = {key: spec.config_class for key, spec in owner.sub_configs_defaults.items()}
        if config is not None:
            weak = config.__dict__.get("weak_encoder_configs") or []
            keys.update({f"{WEAK_KEY}{i}": AutoConfig for i in range(len(weak))})
        return keys


class MoWEConfig(PretrainedConfig):
    r"""
    Configuration of [`MoWEForConditionalGeneration`]: an audio LLM with a Mixture of Weak Encoders
    (Zhang et al., arXiv 2409.06635). `MoWEConfig()` is a valid base-only model (default Whisper and Llama configs).

    Args:
        base_encoder_config (`PretrainedConfig` or `dict`, *optional*):
            Config of the strong base encoder (e.g. Whisper-large-v3's `WhisperConfig`). Always runs. A dict without
            `model_type` is a Whisper config; defaults to `WhisperConfig()`.
        weak_encoder_configs (`list` of `PretrainedConfig` or `dict`, *optional*):
            Configs of the pool of light encoders (Whisper-tiny, HuBERT-base, ...). Families may differ. Each one is
            a sub-config (`config.sub_configs` lists it as `"weak_encoder_configs.<i>"`), so the attention
            implementation and dtype reach it as they reach the other sub-configs. Defaults to an empty pool.
        text_config (`PretrainedConfig` or `dict`, *optional*):
            Config of any causal LLM loadable with `AutoModelForCausalLM`. A dict without `model_type` is a Llama
            config; defaults to `LlamaConfig()`.
        router_type (`str`, *optional*):
            `"data_independent"` (one learned choice for all inputs), `"data_dependent"` (chosen per clip from the
            base features), `"both"` (two blocks, concatenated) or `"none"` (the base-only ablation: no weak pool).
            Defaults to `"both"` (the paper's best) when there is a weak pool, `"none"` when there is none.
        router_top_k (`int`, defaults to 1):
            Weak encoders each router activates.
        router_sampling (`bool`, defaults to `True`):
            In training, each router draws its top-k from its own distribution (Gumbel top-k) instead of taking the
            most probable, so every weak encoder keeps being tried (docs/ARCHITECTURE.md, "Routing"). Eval routing
            is always the deterministic top-k.
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
            Id of the `<|audio|>` placeholder token in the LLM's vocabulary: `processor.audio_token_id` (the
            processor's tokenizer appends `<|audio|>`). `MoWEForConditionalGeneration.from_components` sets it and
            grows the embeddings when the id lies past the LLM's vocabulary. Required to run the model on audio.
        dynamic_audio_length (`bool`, defaults to `False`):
            Encode only the batch's real audio length with Whisper encoders (slicing the positional embeddings,
            masking padded frames) instead of padding every clip to 30 s. Faster; pretrained Whisper only ever
            saw 30 s inputs, so the default keeps fidelity.
        component_checkpoints (`dict`, *optional*):
            Where the pretrained parts come from: `{"base_encoder": id, "weak_encoders": [ids], "text_model": id}`
            (set by `from_components`; the paper presets record them so the parts can be fetched).
    """

    model_type = "mowe"
    sub_configs_defaults = {
        "base_encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }
    sub_configs = _SubConfigKeys()

    def __init__(
        self,
        base_encoder_config: PretrainedConfig | dict | None = None,
        weak_encoder_configs: list[PretrainedConfig | dict] | None = None,
        text_config: PretrainedConfig | dict | None = None,
        router_type: str | None = None,
        router_top_k: int = 1,
        router_sampling: bool = True,
        router_aux_loss_coef: float = 0.1,
        weak_hidden_size: int = 256,
        stack_factor: int = 4,
        projector_hidden_act: str = "gelu",
        audio_token_id: int | None = None,
        dynamic_audio_length: bool = False,
        component_checkpoints: dict | None = None,
        **kwargs,
    ):
        for key, value in (("base_encoder_config", base_encoder_config), ("text_config", text_config)):
            default_type = self.sub_configs_defaults[key].model_type
            setattr(self, key, _as_config({} if value is None else value, key, default_type))
        self.weak_encoder_configs = [
            _as_config(c, f"weak_encoder_configs[{i}]") for i, c in enumerate(weak_encoder_configs or [])
        ]
        if router_type is None:
            router_type = "both" if self.weak_encoder_configs else "none"
        self.router_type = router_type
        self.router_top_k = router_top_k
        self.router_sampling = router_sampling
        self.router_aux_loss_coef = router_aux_loss_coef
        self.weak_hidden_size = weak_hidden_size
        self.stack_factor = stack_factor
        self.projector_hidden_act = projector_hidden_act
        self.audio_token_id = audio_token_id
        self.dynamic_audio_length = dynamic_audio_length
        self.component_checkpoints = component_checkpoints
        # Tie the LM head to the input embeddings exactly when the LLM does (transformers reads the top-level flag).
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
        self.validate_mowe()

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: resolves the weak pool's `sub_configs` keys.
        if name.startswith(WEAK_KEY) and name[len(WEAK_KEY) :].isdigit():
            weak = self.__dict__.get("weak_encoder_configs") or []
            index = int(name[len(WEAK_KEY) :])
            if index < len(weak):
                return weak[index]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith(WEAK_KEY) and name[len(WEAK_KEY) :].isdigit():
            self.weak_encoder_configs[int(name[len(WEAK_KEY) :])] = value
        else:
            super().__setattr__(name, value)

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
        vocab_size = self.text_config.vocab_size
        if self.audio_token_id is not None and not 0 <= self.audio_token_id < vocab_size:
            raise ValueError(
                f"audio_token_id={self.audio_token_id} is outside the LLM's vocabulary ({vocab_size}); use "
                "`MoWEForConditionalGeneration.from_components(..., processor=processor)`, which "
                "grows the embeddings, or set `text_config.vocab_size` to cover it."
            )
        if self.stack_factor < 1:
            raise ValueError(f"stack_factor={self.stack_factor} must be >= 1.")
        if self.weak_hidden_size < 1:
            raise ValueError(f"weak_hidden_size={self.weak_hidden_size} must be >= 1.")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef={self.router_aux_loss_coef} must be >= 0.")

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
        # transformers serialises declared sub-configs held in attributes, not a list of them.
        output = super().to_dict()
        output["weak_encoder_configs"] = [_sub_config_dict(c, c.to_dict()) for c in self.weak_encoder_configs]
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        output = super().to_diff_dict()
        output["weak_encoder_configs"] = [_sub_config_dict(c, c.to_diff_dict()) for c in self.weak_encoder_configs]
        return output


def _sub_config_dict(config: PretrainedConfig, output: dict[str, Any]) -> dict[str, Any]:
    output["model_type"] = config.model_type
    output.pop("transformers_version", None)
    return output

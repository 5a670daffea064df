"""MoWE configuration: a base audio encoder, a pool of weak encoders, routers, a projector and a causal LLM.

Imports nothing but `transformers` at module level (the encoder registry is read inside the methods that need it),
so that serving stacks which pickle remote-code modules by value (vLLM with cloudpickle) can pickle this one.
"""

import copy
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

ROUTER_TYPES = ("both", "data_dependent", "data_independent", "none")


def _sub_config(value: dict | PreTrainedConfig | None, what: str, default_model_type: str | None) -> PreTrainedConfig:
    """A sub-config given as a config object (copied, so the caller's object is never changed), as a dict carrying
    its `model_type` (else `default_model_type`) or as `None` (the default model type's defaults)."""
    if isinstance(value, PreTrainedConfig):
        return copy.deepcopy(value)
    if value is None or isinstance(value, dict):
        value = dict(value or {})
        model_type = value.pop("model_type", default_model_type)
        if model_type is None:
            raise ValueError(f"{what} is a dict without `model_type`; give a config object or add `model_type`.")
        return AutoConfig.for_model(model_type, **value)
    raise ValueError(f"{what} must be a transformers config or a dict, got {type(value).__name__}.")


class MoWEConfig(PreTrainedConfig):
    r"""
    Configuration of [`MoWEForConditionalGeneration`]: an audio LLM with a Mixture of Weak Encoders
    (Zhang et al., arXiv 2409.06635). `MoWEConfig()` is a valid base-only model (default Whisper and Llama configs).

    Args:
        base_encoder_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the strong base encoder (e.g. Whisper-large-v3's `WhisperConfig`). Always runs. A dict without
            `model_type` is a Whisper config; defaults to `WhisperConfig()`.
        weak_encoder_configs (`list` of `PreTrainedConfig` or `dict`, *optional*):
            Configs of the pool of light encoders (Whisper-tiny, HuBERT-base, ...). Families may differ; a dict
            must carry its `model_type`. The model builds them with the attention implementation and dtype of the
            MoWE config. Defaults to an empty pool.
        text_config (`PreTrainedConfig` or `dict`, *optional*):
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
        projector_window_summary (`bool`, defaults to `False`):
            Add a linear map of each audio window's mean and standard deviation over its frames to every audio
            token of that window (before the projector's activation), so each token carries clip-level statistics.
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
        tie_word_embeddings (`bool`, *optional*):
            Tie the LM head to the input embeddings; defaults to what `text_config` says.
    """

    model_type = "mowe"
    # The declaration every transformers 5 release reads (5.20+ also accepts `sub_configs_defaults`, absent before).
    sub_configs = {"base_encoder_config": AutoConfig, "text_config": AutoConfig}

    base_encoder_config: dict | PreTrainedConfig | None = None
    weak_encoder_configs: list[dict | PreTrainedConfig] | None = None
    text_config: dict | PreTrainedConfig | None = None
    router_type: str | None = None
    router_top_k: int = 1
    router_sampling: bool = True
    router_aux_loss_coef: float | int = 0.1
    weak_hidden_size: int = 256
    stack_factor: int = 4
    projector_hidden_act: str = "gelu"
    projector_window_summary: bool = False
    audio_token_id: int | None = None
    dynamic_audio_length: bool = False
    component_checkpoints: dict | None = None
    tie_word_embeddings: bool | None = None

    def __post_init__(self, **kwargs):
        self.base_encoder_config = _sub_config(self.base_encoder_config, "base_encoder_config", "whisper")
        self.text_config = _sub_config(self.text_config, "text_config", "llama")
        self.weak_encoder_configs = [
            _sub_config(c, f"weak_encoder_configs[{i}]", None) for i, c in enumerate(self.weak_encoder_configs or [])
        ]
        if self.router_type is None:
            self.router_type = "both" if self.weak_encoder_configs else "none"
        if self.tie_word_embeddings is None:
            # Tie the LM head exactly when the LLM does (transformers reads the top-level flag).
            self.tie_word_embeddings = getattr(self.text_config, "tie_word_embeddings", False)
        super().__post_init__(**kwargs)
        self.check_settings()

    def check_settings(self) -> None:
        """Raise a `ValueError` naming the fix for any setting the model cannot be built from."""
        from .encoders import encoder_family

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
    def encoder_configs(self) -> list[PreTrainedConfig]:
        """The base encoder's config followed by the weak encoders' configs."""
        return [self.base_encoder_config, *self.weak_encoder_configs]

    @property
    def active_encoder_configs(self) -> list[PreTrainedConfig]:
        """The encoders that run: the base encoder, and the weak pool unless `router_type="none"`."""
        return self.encoder_configs if self.active_routers else [self.base_encoder_config]

    @property
    def audio_front_ends(self) -> list[dict]:
        """The distinct front-ends (log-mel sizes, waveform) the encoders that run need, in input order."""
        from .encoders import audio_front_ends

        return audio_front_ends(self.active_encoder_configs)

    @property
    def audio_frame_spec(self):
        """How the base encoder's frame count follows the clip length (shared with the processor): a frozen
        `encoders.WhisperFrameSpec` or `encoders.ConvFrameSpec`."""
        from .encoders import frame_spec

        return frame_spec(self.base_encoder_config)

    def to_dict(self) -> dict[str, Any]:
        # transformers serialises sub-configs held in attributes, not in a list.
        output = super().to_dict()
        output["weak_encoder_configs"] = [_weak_dict(c) for c in self.weak_encoder_configs]
        return output


def _weak_dict(config: PreTrainedConfig) -> dict[str, Any]:
    output = config.to_dict()
    output.pop("transformers_version", None)
    return output

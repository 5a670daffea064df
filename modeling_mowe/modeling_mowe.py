"""MoWE audio LLM: base encoder + routed weak encoders -> projector -> any causal LLM."""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
)
from transformers.utils import torch_compilable_check
from transformers.utils.generic import can_return_tuple

from .configuration_mowe import MoWEConfig
from .encoders import align_to_frames, encoder_family, mel_channel_offsets
from .routing import (
    DataDependentRouter,
    DataIndependentRouter,
    RoutingDecision,
    load_balancing_loss,
    top_k_gates,
)

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # a torch build without distributed support, or one older than FSDP2's public API
    FSDPModule = None

_GENERATION_INPUTS_SIGNATURE = inspect.signature(GenerationMixin.prepare_inputs_for_generation)

# Every Auto class a user may load a saved folder with, so that `trust_remote_code` finds the code for each.
AUTO_MAP = {
    "AutoConfig": "configuration_mowe.MoWEConfig",
    "AutoModel": "modeling_mowe.MoWEForConditionalGeneration",
    "AutoModelForMultimodalLM": "modeling_mowe.MoWEForConditionalGeneration",
}

# What the idle call of a weak encoder that no window picked runs on: 0.5 s (25 frames at 50 frames/s), short but
# long enough for SpecAugment's time masks of waveform encoders in training (10 frames by default).
IDLE_CALL_SAMPLES = 8_000


@dataclass
class MoWEAudioFeaturesOutput(BaseModelOutputWithPooling):
    """
    What the audio tower returns (`pooler_output` unset) and what `get_audio_features` returns (projected).

    last_hidden_state (`torch.FloatTensor` of shape `(num_windows, num_frames, d_b + num_routers * d_w)`):
        The audio tower's features: base features concatenated with one mixed weak-feature block per active router.
    pooler_output (`torch.FloatTensor` of shape `(num_audio_tokens, hidden_size)`, *optional*):
        The projected audio embeddings: every window's valid audio tokens, in window order, as the `<|audio|>`
        placeholders expect them.
    valid_frames (`torch.LongTensor` of shape `(num_windows,)`): real (non-padding) frames per window.
    router_logits (`torch.FloatTensor` of shape `(num_windows, num_routers, num_weak_encoders)`, *optional*):
        Logits of the active routers, in `config.active_routers` order.
    router_aux_loss (`torch.FloatTensor` scalar, *optional*): the data-dependent router's balancing loss.
    router_indices (`torch.LongTensor` of shape `(num_windows, num_routers, router_top_k)`, *optional*):
        The weak encoders each active router selected for each window (the routing decision, made once, in the tower).
    router_gates (`torch.FloatTensor` of shape `(num_windows, num_routers, router_top_k)`, *optional*):
        The selected encoders' gates (router probabilities) that weighted their features.
    """

    valid_frames: torch.LongTensor | None = None
    router_logits: torch.FloatTensor | None = None
    router_aux_loss: torch.FloatTensor | None = None
    router_indices: torch.LongTensor | None = None
    router_gates: torch.FloatTensor | None = None


@dataclass
class MoWEModelOutputWithPast(BaseModelOutputWithPast):
    """
    audio_hidden_states (`torch.FloatTensor` of shape `(num_audio_tokens, hidden_size)`, *optional*):
        Projected audio embeddings that replaced the `<|audio|>` placeholders.
    router_logits (`torch.FloatTensor` of shape `(num_windows, num_routers, num_weak_encoders)`, *optional*)
    router_aux_loss (`torch.FloatTensor`, *optional*): the data-dependent router's balancing loss, with its graph.
    router_indices (`torch.LongTensor` of shape `(num_windows, num_routers, router_top_k)`, *optional*):
        The weak encoders each router selected per window.
    """

    audio_hidden_states: torch.FloatTensor | None = None
    router_logits: torch.FloatTensor | None = None
    router_aux_loss: torch.FloatTensor | None = None
    router_indices: torch.LongTensor | None = None


@dataclass
class MoWECausalLMOutputWithPast(CausalLMOutputWithPast):
    """
    loss: LM loss + `router_aux_loss_coef * router_aux_loss`.
    router_logits (`torch.FloatTensor` of shape `(num_windows, num_routers, num_weak_encoders)`, *optional*)
    router_aux_loss (`torch.FloatTensor`, *optional*): the data-dependent router's balancing loss, with its graph: a
        loss computed from the logits instead of `loss` adds `router_aux_loss_coef * router_aux_loss` itself (as
        with transformers' MoE models; `MoWESFTTrainer` does this for TRL's fused LM head).
    router_indices (`torch.LongTensor` of shape `(num_windows, num_routers, router_top_k)`, *optional*):
        The weak encoders each router selected per window.
    """

    router_logits: torch.FloatTensor | None = None
    router_aux_loss: torch.FloatTensor | None = None
    router_indices: torch.LongTensor | None = None


def idle_call_policy(weak_encoders: nn.Module) -> str:
    """When the tower calls the weak encoders that no window picked: `"always"` when FSDP2 shards inside the pool
    (each unit's all-gather is a collective that every rank issues, in eval too); `"in_training"` (train mode with
    gradients) under a `torch.distributed` process group, so that every rank calls the same modules and DDP gets a
    gradient for every parameter; else `"never"`: one process has no other rank waiting, and trains truly sparse."""
    if FSDPModule is not None and any(isinstance(module, FSDPModule) for module in weak_encoders.modules()):
        return "always"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "in_training"
    return "never"


class MoWEAudioTower(nn.Module):
    """The strong base encoder plus the routed pool of weak encoders.

    Sparse dispatch: each weak encoder runs once per forward, on the windows routed to it (by either router). The
    gates g_i (router probabilities) multiply the selected encoders' features, which is how the routers get gradients
    from the LM loss; the balancing loss reaches the data-dependent router through the loss it joins. A weak encoder
    that no window picked is skipped, unless `idle_calls` (decided by `train()` / `eval()`, see `idle_call_policy`)
    says that other ranks need the call: then it runs on 0.5 s of audio at weight zero (docs/ARCHITECTURE.md,
    "Dispatch and parallelism").
    """

    def __init__(self, config: MoWEConfig):
        super().__init__()
        self.config = config
        self.front_ends = config.audio_front_ends
        self.mel_offsets = mel_channel_offsets(self.front_ends)
        base_family = encoder_family(config.base_encoder_config)
        self.base_spec = base_family.frame_spec(config.base_encoder_config)
        self.base_encoder = base_family.build(config.base_encoder_config)
        self.base_hidden_size = base_family.hidden_size(config.base_encoder_config)

        self.routers = config.active_routers
        weak_configs = config.weak_encoder_configs if self.routers else []
        # transformers passes the dtype and attention implementation to the sub-configs a config declares by
        # attribute; the weak pool is a list, so each weak encoder takes them here (the implementation unless its
        # config has its own; at run time `set_attn_implementation` gives them the top-level one).
        inherits_attention = [c._attn_implementation is None for c in weak_configs]
        for weak_config in weak_configs:
            weak_config.dtype = config.dtype
        self.weak_specs = [encoder_family(c).frame_spec(c) for c in weak_configs]
        self.weak_encoders = nn.ModuleList(encoder_family(c).build(c) for c in weak_configs)
        for encoder, inherits in zip(self.weak_encoders, inherits_attention):
            if inherits and config._attn_implementation is not None:
                encoder.set_attn_implementation(config._attn_implementation)
        self.weak_projections = nn.ModuleList(
            nn.Linear(encoder_family(c).hidden_size(c), config.weak_hidden_size) for c in weak_configs
        )
        num_weak = len(weak_configs)
        self.router_independent = DataIndependentRouter(num_weak) if "data_independent" in self.routers else None
        self.router_dependent = (
            DataDependentRouter(self.base_hidden_size, num_weak) if "data_dependent" in self.routers else None
        )
        self.idle_calls = idle_call_policy(self.weak_encoders)

    @property
    def output_size(self) -> int:
        return self.base_hidden_size + len(self.routers) * self.config.weak_hidden_size

    @property
    def _no_split_modules(self) -> list[str]:
        """The encoders' own `_no_split_modules` (their layer classes), which the parent's `post_init` collects:
        `device_map="auto"` splits the tower between encoder layers, and FSDP's class-based wrapping shards each.
        Read from the modules, not declared: which classes exist depends on the families the config picks, and
        accelerate refuses to wrap an absent class (an encoder-only Whisper declares its decoder layer too)."""
        encoders = (self.base_encoder, *self.weak_encoders)
        present = {type(module).__name__ for encoder in encoders for module in encoder.modules()}
        return sorted({name for encoder in encoders for name in encoder._no_split_modules or () if name in present})

    def encoder_inputs(
        self, config, input_features: torch.Tensor | None, input_values: torch.Tensor | None
    ) -> torch.Tensor:
        """The slice of the model inputs that the encoder of `config` reads."""
        front_end = encoder_family(config).front_end(config)
        if front_end["kind"] == "log_mel":
            if input_features is None:
                raise ValueError(
                    f"An encoder needs log-mel `input_features` ({front_end['n_mels']} bins) but none were given; "
                    "prepare the audio with MoWEProcessor."
                )
            check_mel_bins(input_features, self.front_ends)
            start = self.mel_offsets[front_end["n_mels"]]
            return input_features[:, start : start + front_end["n_mels"]]
        if input_values is None:
            raise ValueError("A waveform encoder needs `input_values` but none were given; use MoWEProcessor.")
        return input_values

    def run_encoder(
        self, config, encoder, inputs: torch.Tensor, lengths: torch.Tensor, dynamic: bool | None = None, **kwargs
    ) -> BaseModelOutput:
        """`encoder` on `inputs` of clips of `lengths` samples `(b,)`; `last_hidden_state` `(b, frames, hidden_size)`.
        `dynamic` defaults to `config.dynamic_audio_length` (see the encoder family's `encode`); `kwargs`
        (`output_hidden_states`, `output_attentions`) go to the encoder."""
        family = encoder_family(config)
        dtype = next(encoder.parameters()).dtype
        dynamic = self.config.dynamic_audio_length if dynamic is None else dynamic
        return family.encode(encoder, inputs.to(dtype), lengths, dynamic=dynamic, **kwargs)

    def train(self, mode: bool = True) -> MoWEAudioTower:
        """Set the mode, and decide `idle_calls` for the forwards that follow (`idle_call_policy`): every launcher
        calls `train()` / `eval()` after it set up the process group and wrapped the model."""
        super().train(mode)
        self.idle_calls = idle_call_policy(self.weak_encoders)
        return self

    def forward(
        self,
        input_features: torch.Tensor | None,
        input_values: torch.Tensor | None,
        audio_lengths: torch.Tensor,
        **kwargs,
    ) -> MoWEAudioFeaturesOutput:
        """
        Args:
            input_features: `(num_windows, sum of distinct n_mels, 3000)` stacked log-mel spectrograms.
            input_values: `(num_windows, num_samples)` 16 kHz waveforms, zero-padded.
            audio_lengths: `(num_windows,)` real samples per window.
            kwargs: `output_hidden_states` / `output_attentions` for the base encoder, whose `hidden_states` /
                `attentions` the output then holds.
        """
        config = self.config
        base_inputs = self.encoder_inputs(config.base_encoder_config, input_features, input_values)
        base = self.run_encoder(config.base_encoder_config, self.base_encoder, base_inputs, audio_lengths, **kwargs)
        base_hidden = base.last_hidden_state
        base_outputs = {"hidden_states": base.hidden_states, "attentions": base.attentions}
        num_windows, num_base_frames = base_hidden.shape[:2]
        valid_frames = self.base_spec.num_frames(audio_lengths).clamp(max=num_base_frames)
        if not self.routers:
            return MoWEAudioFeaturesOutput(last_hidden_state=base_hidden, valid_frames=valid_frames, **base_outputs)

        router_logits, decisions = self.route(base_hidden, valid_frames)
        router_indices = torch.stack([decision.index for decision in decisions], dim=1)  # (windows, routers, top_k)
        router_gates = torch.stack([decision.gates for decision in decisions], dim=1)
        # (windows, routers, weak encoders): each router's gate on each weak encoder, 0 where it did not select it.
        gates = router_gates.new_zeros(*router_indices.shape[:2], len(self.weak_encoders))
        gates = gates.scatter(-1, router_indices, router_gates)
        # Which windows each weak encoder runs on (picked by any router), read on the host once for the whole pool.
        picked = torch.zeros_like(gates, dtype=torch.bool).scatter(-1, router_indices, True).any(1).T.cpu()
        # One block per router: (routers, windows, frames, weak_hidden_size), joined to the base features below.
        blocks = base_hidden.new_zeros(len(self.routers), num_windows, num_base_frames, config.weak_hidden_size)
        call_every_encoder = self.idle_calls == "always" or (
            self.idle_calls == "in_training" and self.training and torch.is_grad_enabled()
        )
        for weak_index, windows in enumerate(picked):
            rows = windows.nonzero(as_tuple=True)[0].to(base_hidden.device)
            if rows.numel() == 0:
                if call_every_encoder:
                    idle = self.idle_weak_features(weak_index, input_features, input_values)
                    no_rows = idle[None, :0, :1].expand(len(self.routers), 0, num_base_frames, -1)
                    blocks = blocks.index_add(1, rows, no_rows.to(blocks.device, blocks.dtype))
                continue
            hidden = self.weak_features(weak_index, rows, input_features, input_values, audio_lengths, num_base_frames)
            hidden = hidden.to(base_hidden.device)
            gate = gates[rows, :, weak_index].T  # (routers, len(rows))
            # (routers, len(rows), frames, weak_hidden_size)
            weighted = hidden * gate[..., None, None].to(hidden.dtype)
            # `.to(blocks.dtype)`: under autocast the projection computes in bf16/fp16 while the blocks keep the base
            # features' dtype (fp32 for fp32 weights), as do the sums over weak encoders.
            blocks = blocks.index_add(1, rows, weighted.to(blocks.dtype))

        aux_loss = None
        if "data_dependent" in self.routers:
            decision = decisions[self.routers.index("data_dependent")]
            aux_loss = load_balancing_loss(decision.probs, decision.index)
        return MoWEAudioFeaturesOutput(
            last_hidden_state=torch.cat([base_hidden, *blocks], dim=-1),
            **base_outputs,
            valid_frames=valid_frames,
            router_logits=torch.stack(router_logits, dim=1),
            router_aux_loss=aux_loss,
            router_indices=router_indices,
            router_gates=router_gates,
        )

    def route(
        self, base_hidden: torch.Tensor, valid_frames: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[RoutingDecision]]:
        """Each active router's logits `(num_windows, num_weak_encoders)` and its `RoutingDecision` (index and gates
        `(num_windows, top_k)`), from the base features `(num_windows, T, d_b)`."""
        router_logits, decisions = [], []
        for router in self.routers:
            if router == "data_independent":
                logits = self.router_independent(base_hidden.shape[0])
            else:
                logits = self.router_dependent(base_hidden, valid_frames)
            # With `device_map` the routers may sit on another device than the base features: route where they are.
            router_logits.append(logits)
            sample = self.training and self.config.router_sampling
            decisions.append(top_k_gates(logits.to(base_hidden.device), self.config.router_top_k, sample=sample))
        return router_logits, decisions

    def weak_features(
        self,
        weak_index: int,
        rows: torch.Tensor,
        input_features: torch.Tensor | None,
        input_values: torch.Tensor | None,
        audio_lengths: torch.Tensor,
        num_base_frames: int,
    ) -> torch.Tensor:
        """Weak encoder `weak_index` run on the windows `rows` only -> `(len(rows), num_base_frames,
        weak_hidden_size)`: its features moved onto the base frame grid (on the device of `rows`) and projected, not
        yet gated. The routed windows keep the batch's width (padding masked): slicing them to their own longest
        would read the lengths on the host."""
        weak_config, spec = self.config.weak_encoder_configs[weak_index], self.weak_specs[weak_index]
        lengths = audio_lengths.to(rows.device)[rows]
        inputs = self.encoder_inputs(weak_config, input_features, input_values)
        inputs = inputs[rows.to(inputs.device)]
        hidden = self.run_encoder(weak_config, self.weak_encoders[weak_index], inputs, lengths).last_hidden_state
        hidden = hidden.to(rows.device)
        weak_valid = spec.num_frames(lengths).clamp(max=hidden.shape[1])
        hidden = align_to_frames(hidden, spec, self.base_spec, weak_valid, num_base_frames)
        projection = self.weak_projections[weak_index]
        return projection(hidden.to(projection.weight.dtype))

    def idle_weak_features(
        self, weak_index: int, input_features: torch.Tensor | None, input_values: torch.Tensor | None
    ) -> torch.Tensor:
        """Weak encoder `weak_index` and its projection on the first `IDLE_CALL_SAMPLES` of the first window (a
        whole window when shorter), Whisper encoders at that length, not padded to 30 s -> `(1, frames,
        weak_hidden_size)`: the call a training step makes for an encoder that no window picked."""
        weak_config = self.config.weak_encoder_configs[weak_index]
        inputs = self.encoder_inputs(weak_config, input_features, input_values)[:1]
        if inputs.ndim == 2:  # a waveform
            samples = min(IDLE_CALL_SAMPLES, inputs.shape[-1])
            inputs = inputs[:, :samples]
        else:  # log-mels: the frames a dynamic-length Whisper reads for that many samples
            samples = IDLE_CALL_SAMPLES
            inputs = inputs[..., : self.weak_specs[weak_index].mel_frames_read(samples)]
        lengths = torch.full((1,), samples, device=inputs.device)
        hidden = self.run_encoder(weak_config, self.weak_encoders[weak_index], inputs, lengths, dynamic=True)
        hidden = hidden.last_hidden_state
        projection = self.weak_projections[weak_index]
        return projection(hidden.to(projection.weight.device, projection.weight.dtype))


class MoWEProjector(nn.Module):
    """Stack `stack_factor` consecutive frames, then Linear -> activation -> Linear into the LLM's hidden size.

    With `config.projector_window_summary`, `window_summary` maps each window's mean and standard deviation over its
    valid frames to one vector added to every token of that window before the activation: the clip-level statistics
    a linear probe reads speaker traits from, put where every audio token carries them."""

    def __init__(self, config: MoWEConfig, input_size: int):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.stack_factor = config.stack_factor
        self.linear_1 = nn.Linear(input_size * config.stack_factor, hidden_size)
        self.window_summary = nn.Linear(2 * input_size, hidden_size) if config.projector_window_summary else None
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor, valid_frames: torch.Tensor) -> torch.Tensor:
        """Frames [N, T, D] with `valid_frames` [N] real frames -> the valid audio tokens of all windows, in order,
        [sum_n ceil(valid_frames[n] / stack_factor), hidden_size]. Padded frames are zeroed before stacking, so a
        window's tokens never depend on the batch it came in."""
        num_windows, frames, dim = hidden.shape
        frame_valid = torch.arange(frames, device=hidden.device)[None, :] < valid_frames[:, None]
        hidden = hidden * frame_valid[..., None].to(hidden.dtype)
        summary = None
        if self.window_summary is not None:
            summary = self.window_summary(window_statistics(hidden, valid_frames).to(self.window_summary.weight.dtype))
        pad = -frames % self.stack_factor
        hidden = nn.functional.pad(hidden, (0, 0, 0, pad))
        stacked = hidden.reshape(num_windows, -1, dim * self.stack_factor)
        tokens_per_window = -(-valid_frames // self.stack_factor)
        token_valid = torch.arange(stacked.shape[1], device=hidden.device)[None, :] < tokens_per_window[:, None]
        stacked = stacked[token_valid].to(self.linear_1.weight.dtype)
        hidden_tokens = self.linear_1(stacked)
        if summary is not None:
            window_of_token = torch.arange(num_windows, device=hidden.device)[:, None].expand_as(token_valid)
            hidden_tokens = hidden_tokens + summary[window_of_token[token_valid]]
        return self.linear_2(self.act(hidden_tokens))


def window_statistics(frames: torch.Tensor, valid_frames: torch.Tensor) -> torch.Tensor:
    """Frames [N, T, D] -> each window's mean and standard deviation over its first `valid_frames` [N] frames,
    [N, 2 * D], in float32; padded frames do not count."""
    frame_valid = (torch.arange(frames.shape[1], device=frames.device)[None, :] < valid_frames[:, None])[..., None]
    count = valid_frames.clamp(min=1).to(torch.float32)[:, None]
    mean = (frames.float() * frame_valid).sum(dim=1) / count
    variance = (((frames.float() - mean[:, None]) ** 2) * frame_valid).sum(dim=1) / count
    return torch.cat([mean, (variance + 1e-6).sqrt()], dim=-1)  # + 1e-6: a finite gradient for a one-frame window


def check_mel_bins(input_features: torch.Tensor, front_ends: list[dict]) -> None:
    """Raise a `ValueError` when `input_features` `(num_windows, mel bins, frames)` cannot hold the stacked log-mel
    sizes the encoders read (which would end in a convolution error). More bins are fine: a base-only ablation
    (`router_type="none"`) reads the first block of its pool's processor output. Reads shapes only: no device sync."""
    sizes = [f["n_mels"] for f in front_ends if f["kind"] == "log_mel"]
    if input_features.ndim != 3 or input_features.shape[1] < sum(sizes):
        raise ValueError(
            f"`input_features` has shape {tuple(input_features.shape)} but this model's encoders read "
            f"(num_windows, {sum(sizes)}, frames): log-mels of {' + '.join(map(str, sizes))} bins stacked on axis 1. "
            "Prepare the audio with this model's processor (MoWEProcessor / MoWEFeatureExtractor.from_mowe_config)."
        )


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise a `ValueError` for token ids outside the embedding table (which would end in an `IndexError`).
    `torch_compilable_check`: a compiler hint under `torch.compile`, a check in eager mode."""
    torch_compilable_check(
        ((input_ids >= 0) & (input_ids < vocab_size)).all(),
        lambda: (
            f"`input_ids` holds token ids outside the LLM's vocabulary (0 to {vocab_size - 1}); tokenize with this "
            "model's processor, or after adding tokens grow the embeddings with "
            "`model.resize_token_embeddings(len(processor.tokenizer))`."
        ),
    )


def check_audio_inputs(
    input_features: torch.Tensor | None, input_values: torch.Tensor | None, audio_lengths: torch.Tensor | None
) -> None:
    """Raise a `ValueError` for audio inputs that would otherwise end in a torch error or in silent NaN logits:
    missing or negative `audio_lengths`, NaN/Inf features. One check on the device (`torch_compilable_check`: under
    `torch.compile` a runtime assertion in the graph, no host sync); the message is worked out only on failure."""
    if audio_lengths is None:
        raise ValueError("`audio_lengths` (real samples per audio window) is required with audio inputs.")
    problems = {
        "`audio_lengths` has negative values; give the real number of samples of each window (>= 0), "
        "as MoWEProcessor returns it.": (audio_lengths >= 0).all(),
    }
    for name, values in (("input_features", input_features), ("input_values", input_values)):
        if values is not None:
            problems[
                f"`{name}` contains NaN or Inf values; check the audio (MoWEProcessor rejects NaN/Inf samples) "
                "and any transform applied to the features after it."
            ] = torch.isfinite(values).all()
    passed = torch.stack([ok.to(audio_lengths.device) for ok in problems.values()])
    torch_compilable_check(
        passed.all(), lambda: next(message for message, ok in zip(problems, passed.tolist()) if not ok)
    )


def _under_any_prefix(name: str) -> str:
    """A module-name pattern matching `name` in `MoWEModel` and under any prefix (`model.` in the LM-head model)."""
    return rf"(?:.+\.)?{re.escape(name)}"


# The small, freshly trained parts, which QLoRA trains in full: transformers' quantizers skip `_keep_in_fp32_modules`
# on top of their own skips (the LM head), and a `dtype=torch.float16` load keeps them in fp32.
FULL_PRECISION_MODULES = [
    _under_any_prefix(name)
    for name in (
        "audio_tower.weak_encoders",
        "audio_tower.weak_projections",
        "audio_tower.router_independent",
        "audio_tower.router_dependent",
        "multi_modal_projector",
    )
]


def keeps_base_encoder_unquantized(config: MoWEConfig) -> bool:
    """Whether a quantized load also leaves the frozen base encoder unconverted: yes, unless the quantization config
    lists the modules to skip itself (`BitsAndBytesConfig(llm_int8_skip_modules=[...])`, `modules_to_not_convert`),
    which, as for any model, replaces the default skips."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return False
    settings = quantization if isinstance(quantization, dict) else vars(quantization)
    return settings.get("llm_int8_skip_modules") is None and settings.get("modules_to_not_convert") is None


class MoWEPreTrainedModel(PreTrainedModel):
    config_class = MoWEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    # Plus the encoders' and the LLM's layer classes, gathered from the sub-models by `post_init`.
    _no_split_modules = ["MoWEProjector"]
    _keep_in_fp32_modules = FULL_PRECISION_MODULES
    _skip_keys_device_placement = ["past_key_values"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        # The code files are copied for a class registered for an Auto class (the package or a remote-code load does
        # not always register it); `AUTO_MAP` then names every Auto class.
        self.config.auto_map = dict(AUTO_MAP)
        if self._auto_class is None:
            self.register_for_auto_class("AutoModel")
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        from transformers import initialization as init

        std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
        if isinstance(module, DataIndependentRouter):
            init.zeros_(module.logits)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class MoWEModel(MoWEPreTrainedModel):
    """Audio tower + projector + the LLM's base model (no LM head); returns `last_hidden_state`."""

    def __init__(self, config: MoWEConfig):
        super().__init__(config)
        self.audio_tower = MoWEAudioTower(config)
        self.multi_modal_projector = MoWEProjector(config, self.audio_tower.output_size)
        self.language_model = AutoModel.from_config(config.text_config)
        if keeps_base_encoder_unquantized(config):  # depends on the quantization config the model is loaded with
            self._keep_in_fp32_modules = [*FULL_PRECISION_MODULES, _under_any_prefix("audio_tower.base_encoder")]
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_audio_features(
        self,
        input_features: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | MoWEAudioFeaturesOutput:
        """Encode and project audio windows (arguments: see [`MoWEModel.forward`]). `pooler_output` holds the
        projected audio embeddings `(num_audio_tokens, hidden_size)`; `last_hidden_state` the tower's features.
        With `output_hidden_states=True` / `output_attentions=True`, `hidden_states` / `attentions` are the base
        encoder's (the encoder that runs on every clip), as Qwen2-Audio and Voxtral return their audio encoder's."""
        check_audio_inputs(input_features, input_values, audio_lengths)
        audio = self.audio_tower(input_features, input_values, audio_lengths, **kwargs)
        embeds = self.multi_modal_projector(audio.last_hidden_state, audio.valid_frames)
        return MoWEAudioFeaturesOutput(**audio, pooler_output=embeds)  # field order kept for tuple outputs

    def get_placeholder_mask(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, num_audio_tokens: int
    ) -> torch.Tensor:
        """Boolean mask [batch, seq, hidden] of the `<|audio|>` positions; checks their count against the audio's
        `num_audio_tokens` on the device (a runtime assertion under `torch.compile`)."""
        if self.config.audio_token_id is None:
            raise ValueError(
                "config.audio_token_id is not set, so the `<|audio|>` placeholders cannot be found; set it to "
                "`processor.audio_token_id` (from_components does this)."
            )
        if input_ids is None:
            audio_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.audio_token_id, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == audio_embedding).all(-1)
        else:
            mask = input_ids == self.config.audio_token_id
        torch_compilable_check(
            mask.sum() == num_audio_tokens,
            lambda: f"The text has {int(mask.sum())} audio placeholder tokens but the audio gives {num_audio_tokens} "
            "audio embeddings. Build the inputs with MoWEProcessor, which expands each <|audio|> to its clip's "
            "length (and check that truncation did not cut audio tokens).",
        )
        return mask[..., None].expand_as(inputs_embeds)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        audio_lengths: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple | MoWEModelOutputWithPast:
        r"""
        input_features (`torch.FloatTensor` of shape `(num_windows, sum of distinct n_mels, 3000)`, *optional*):
            Log-mel spectrograms of every distinct mel size the encoders need, stacked on the channel axis.
        input_values (`torch.FloatTensor` of shape `(num_windows, num_samples)`, *optional*):
            16 kHz waveforms for waveform encoders (HuBERT, wav2vec2, ...).
        audio_lengths (`torch.LongTensor` of shape `(num_windows,)`, *optional*): real samples per window.
        position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Positions of the tokens; `generate` derives them from the attention mask, so left padding works.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            embeddings = self.get_input_embeddings()
            if isinstance(embeddings, nn.Embedding):
                check_token_ids(input_ids, embeddings.num_embeddings)
            inputs_embeds = embeddings(input_ids)

        audio_embeds = router_logits = router_aux_loss = router_indices = None
        if input_features is not None or input_values is not None:
            audio = self.get_audio_features(input_features, input_values, audio_lengths, return_dict=True)
            audio_embeds, router_logits = audio.pooler_output, audio.router_logits
            router_aux_loss, router_indices = audio.router_aux_loss, audio.router_indices
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, audio_embeds.shape[0])
            inputs_embeds = inputs_embeds.masked_scatter(
                mask, audio_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
            )

        for flag in ("output_hidden_states", "output_attentions"):  # the MoWE config's flags reach the LLM
            if kwargs.get(flag) is None and getattr(self.config, flag):
                kwargs[flag] = True
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        return MoWEModelOutputWithPast(
            **outputs,
            audio_hidden_states=audio_embeds,
            router_logits=router_logits,
            router_aux_loss=router_aux_loss,
            router_indices=router_indices,
        )


class MoWEForConditionalGeneration(MoWEPreTrainedModel, GenerationMixin):
    """MoWE audio LLM with a language-modelling head: `generate()` answers about audio."""

    # The LLM's own plan (collected from it by `post_init`) shards its embeddings; the head is sharded with them, as
    # `LlamaForCausalLM` and `LlavaForConditionalGeneration` declare it (tied or not).
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: MoWEConfig):
        super().__init__(config)
        self.model = MoWEModel(config)
        text_config = config.text_config
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        embeddings = self.model.get_input_embeddings()
        embedding_name = next(n for n, m in self.model.language_model.named_modules() if m is embeddings)
        if embedding_name != "embed_tokens":  # the LLM is any AutoModel: GPT-2 names its embedding `wte`
            self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{embedding_name}.weight"}
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_audio_features(self, *args, **kwargs) -> tuple | MoWEAudioFeaturesOutput:
        return self.model.get_audio_features(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args, **kwargs) -> dict:
        """GenerationMixin's inputs, without the audio where the cache already holds it.

        The audio is encoded once, in the first forward that sees its `<|audio|>` tokens: after the prefill (before
        5.20 transformers dropped `input_features` then, but not `input_values`), and when `generate` continues from a
        returned cache whose tokens already cover the audio (transformers passes the audio on to that first forward,
        whose new tokens then hold no placeholder).
        """
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        audio_keys = [key for key in ("input_features", "input_values", "audio_lengths") if key in model_inputs]
        if not audio_keys:
            return model_inputs
        arguments = _GENERATION_INPUTS_SIGNATURE.bind(self, *args, **kwargs).arguments
        extra = arguments.get("kwargs", {})
        after_prefill = not arguments.get("is_first_iteration") and extra.get("use_cache", True)
        if after_prefill or self._cache_holds_the_audio(model_inputs.get("input_ids"), arguments, extra):
            for key in audio_keys:
                del model_inputs[key]
        return model_inputs

    def _cache_holds_the_audio(self, input_ids: torch.Tensor | None, arguments: dict, extra: dict) -> bool:
        """Whether generation continues from a non-empty cache and the tokens still to run hold no `<|audio|>`."""
        caches = [arguments.get(name, extra.get(name)) for name in ("cache", "past_key_values")]
        if not any(isinstance(cache, Cache) and cache.get_seq_length() > 0 for cache in caches) or input_ids is None:
            return False
        return not bool((input_ids == self.config.audio_token_id).any())

    # `generate` accepts a model kwarg only if this method (or `forward`) names it, so the override declares what
    # transformers' own method declares. That differs between versions (the cache is `past_key_values` in 5.15,
    # `cache` in 5.25), hence copied rather than written out.
    prepare_inputs_for_generation.__signature__ = _GENERATION_INPUTS_SIGNATURE

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        audio_lengths: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> tuple | MoWECausalLMOutputWithPast:
        r"""
        input_features, input_values, audio_lengths, position_ids: see [`MoWEModel.forward`] (what `MoWEProcessor`
            returns; `generate` makes `position_ids` from the attention mask).
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token labels; -100 is ignored. The returned loss adds `router_aux_loss_coef * router_aux_loss`.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            input_features=input_features,
            input_values=input_values,
            audio_lengths=audio_lengths,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss_kwargs = dict(kwargs)
            # A batch without a trainable token (every label -100) would have a mean loss of 0/0 = NaN, and one NaN
            # step corrupts every trained weight: the token-mean is taken as sum / max(count, 1), so such a batch
            # gives loss 0 and zero gradients. `num_items_in_batch` (from the Trainer) is bounded below the same way.
            count = loss_kwargs.get("num_items_in_batch")
            if count is None:
                shifted = loss_kwargs.get("shift_labels")
                shifted = labels[..., 1:] if shifted is None else shifted
                count = (shifted != loss_kwargs.get("ignore_index", -100)).sum()
            loss_kwargs["num_items_in_batch"] = count.clamp(min=1) if torch.is_tensor(count) else max(count, 1)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **loss_kwargs
            )
            if outputs.router_aux_loss is not None:
                # Part of the loss's graph, so whatever scales the loss (gradient accumulation's 1/n, GradScaler's S)
                # scales the balancing gradient alike.
                loss = loss + self.config.router_aux_loss_coef * outputs.router_aux_loss.to(loss.dtype)

        llm_outputs = {k: v for k, v in outputs.items() if k not in ("last_hidden_state", "audio_hidden_states")}
        return MoWECausalLMOutputWithPast(loss=loss, logits=logits, **llm_outputs)

    @classmethod
    def from_components(
        cls,
        base_encoder: str | Path | PreTrainedModel,
        weak_encoders: list[str | Path | PreTrainedModel] = (),
        text_model: str | Path | PreTrainedModel | None = None,
        *,
        processor=None,
        dtype: torch.dtype | str | None = None,
        quantization_config=None,
        **config_kwargs,
    ) -> MoWEForConditionalGeneration:
        """Compose a MoWE model from pretrained parts (Hub ids, local folders or loaded models).

        The encoders and the LLM keep their pretrained weights; routers, weak projections and the projector are
        freshly initialised. `config_kwargs` go to [`MoWEConfig`] (`router_type`, `top_k`, `audio_token_id`, ...).
        Pass `processor=` (built with `MoWEProcessor.from_components` from the same parts): the model takes its
        `audio_token_id`, grows its embeddings to the tokenizer's added tokens (audio placeholder, chat turn markers)
        and its generation config stops at the template's end-of-turn token(s) and EOS, so answers end. Without
        it, `audio_token_id` (default: one row appended for `<|audio|>`) is the only token added.

        `quantization_config` (e.g. `BitsAndBytesConfig(load_in_4bit=True)`) quantizes the composed model exactly as
        `from_pretrained(..., quantization_config=...)` quantizes a saved one: the LLM's linear layers, not its head,
        not the new parts nor the weak pool, and the base encoder only if the config lists the modules to skip
        itself (see `keeps_base_encoder_unquantized`). The parts are composed in `dtype` in CPU memory first.

        Example:
            model = MoWEForConditionalGeneration.from_components(
                "openai/whisper-large-v3", ["openai/whisper-tiny"] * 4, "meta-llama/Meta-Llama-3-8B-Instruct",
                dtype=torch.bfloat16)
        """
        if text_model is None:
            raise ValueError("from_components needs `text_model` (an AutoModelForCausalLM id, folder or model).")
        for part in [base_encoder, *weak_encoders, text_model]:
            if getattr(part, "is_quantized", False):
                raise ValueError(
                    f"{type(part).__name__} was loaded quantized, and a quantized part cannot be composed: pass its "
                    "id or folder and `quantization_config=` to from_components, which quantizes the composed model."
                )
        if processor is not None:
            config_kwargs["audio_token_id"] = processor.audio_token_id
        config_kwargs.setdefault("component_checkpoints", component_sources(base_encoder, weak_encoders, text_model))
        encoders, llm = load_components(base_encoder, weak_encoders, text_model, dtype)
        text_config = copy.deepcopy(llm.config)
        audio_token_id = config_kwargs.setdefault("audio_token_id", text_config.vocab_size)
        if audio_token_id >= text_config.vocab_size:
            text_config.vocab_size = audio_token_id + 1  # the embeddings are resized to match below
        config = MoWEConfig(
            base_encoder_config=encoders[0].config,
            weak_encoder_configs=[e.config for e in encoders[1:]],
            text_config=text_config,
            **config_kwargs,
        )
        model = cls._graft_components(config, encoders, llm)
        needed = max(config.audio_token_id + 1, len(processor.tokenizer) if processor is not None else 0)
        if needed > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(needed)
        config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]
        model.tie_weights()
        if processor is not None:
            model.generation_config.eos_token_id = processor.end_of_turn_token_ids
            model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
        if quantization_config is not None:
            model = cls._load_quantized(model, quantization_config)
        return model

    @classmethod
    def _load_quantized(cls, model: MoWEForConditionalGeneration, quantization_config) -> MoWEForConditionalGeneration:
        """`model` loaded again by `from_pretrained` from its state dict (in memory) with `quantization_config`, so a
        composed model is quantized, placed and marked (`hf_quantizer`, `is_loaded_in_4bit`) like a saved one."""
        quantized = cls.from_pretrained(
            None,
            config=model.config,
            state_dict=model.state_dict(),
            quantization_config=quantization_config,
            dtype=model.dtype,
        )
        quantized.generation_config = copy.deepcopy(model.generation_config)
        return quantized

    @classmethod
    def _graft_components(
        cls, config: MoWEConfig, encoders: list[nn.Module], llm: PreTrainedModel
    ) -> MoWEForConditionalGeneration:
        """`cls(config)` built on the meta device with the loaded parts put in its place (their weights kept, not
        copied); the new parts (routers, weak projections, projector) initialised on the LLM's device; all in the
        LLM's dtype. `encoders` is the base encoder then the weak ones."""
        with torch.device("meta"):
            model = cls(config)
        tower = model.model.audio_tower
        tower.base_encoder = encoders[0]
        if tower.routers:
            tower.weak_encoders = nn.ModuleList(encoders[1:])
        model.model.language_model = llm.get_decoder() if hasattr(llm, "get_decoder") else llm.model
        model.lm_head = llm.get_output_embeddings()
        device = llm.get_output_embeddings().weight.device
        for module in model.modules():
            if any(p.is_meta for p in module.parameters(recurse=False)):
                module.to_empty(device=device, recurse=False)
                model._init_weights(module)
        return model.to(llm.dtype)


def load_audio_encoder(part: str | Path | PreTrainedModel, dtype: torch.dtype | str | None = None) -> nn.Module:
    """An audio encoder (Hub id, local folder or loaded model) as its family's encoder module, as MoWE runs it.

    A folder whose config's `architectures` names the family's encoder-only class (`WhisperEncoder`, saved by
    `WhisperEncoder.save_pretrained`) loads as that class; anything else through AutoModel (`WhisperModel`,
    `WhisperForConditionalGeneration` folders give their encoder; HuBERT/wav2vec2 folders their base model).
    """
    if not isinstance(part, PreTrainedModel):
        config = AutoConfig.from_pretrained(part)
        family = encoder_family(config, what=f"The config of {part}")
        if set(config.architectures or ()) & set(getattr(family, "encoder_only_architectures", ())):
            part = family.encoder_only_class().from_pretrained(part, config=config, dtype=dtype)
        else:
            part = AutoModel.from_pretrained(part, dtype=dtype)
    return encoder_family(part.config).from_pretrained_model(part)


def load_components(
    base_encoder: str | Path | PreTrainedModel,
    weak_encoders: list[str | Path | PreTrainedModel],
    text_model: str | Path | PreTrainedModel,
    dtype: torch.dtype | str | None = None,
) -> tuple[list[nn.Module], PreTrainedModel]:
    """The parts of `MoWEForConditionalGeneration.from_components` loaded (ids and folders; models are kept as
    given): the base then the weak encoders as their family's encoder module (`load_audio_encoder`), and the
    `AutoModelForCausalLM`."""
    encoders = [load_audio_encoder(part, dtype) for part in [base_encoder, *weak_encoders]]
    llm = text_model
    if not isinstance(llm, PreTrainedModel):
        llm = AutoModelForCausalLM.from_pretrained(text_model, dtype=dtype)
    return encoders, llm


def component_sources(
    base_encoder: str | Path | PreTrainedModel,
    weak_encoders: list[str | Path | PreTrainedModel],
    text_model: str | Path | PreTrainedModel,
) -> dict:
    """Where each part came from (its id or folder; a loaded model's `name_or_path`), for the config and card."""

    def source(part):
        return part.config.name_or_path if isinstance(part, PreTrainedModel) else str(part)

    return {
        "base_encoder": source(base_encoder),
        "weak_encoders": [source(w) for w in weak_encoders],
        "text_model": source(text_model),
    }


__all__ = ["MoWEPreTrainedModel", "MoWEModel", "MoWEForConditionalGeneration", "load_audio_encoder"]

"""MoWE audio LLM: base encoder + routed weak encoders -> projector -> any causal LLM."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

from .configuration_mowe import MoWEConfig
from .encoders import (
    align_to_frames,
    encoder_family,
    mel_channel_offsets,
    num_frames,
)
from .routing import (
    AddAuxiliaryLoss,
    DataDependentRouter,
    DataIndependentRouter,
    load_balancing_loss,
    top_k_gates,
)


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
    router_aux_loss (`torch.FloatTensor`, *optional*): balancing loss, detached (its gradient is already injected).
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
    router_aux_loss (`torch.FloatTensor`, *optional*): balancing loss, detached (its gradient is already injected).
    router_indices (`torch.LongTensor` of shape `(num_windows, num_routers, router_top_k)`, *optional*):
        The weak encoders each router selected per window.
    """

    router_logits: torch.FloatTensor | None = None
    router_aux_loss: torch.FloatTensor | None = None
    router_indices: torch.LongTensor | None = None


class MoWEAudioTower(nn.Module):
    """The strong base encoder plus the routed pool of weak encoders.

    Sparse dispatch: each weak encoder runs only on the windows routed to it (by either router) and not at all when
    no window picked it. The gates g_i (router probabilities) multiply the selected encoders' features, which is how
    the routers get gradients from the LM loss; the balancing loss reaches the data-dependent router through
    `AddAuxiliaryLoss`. In training, every trainable parameter of the weak pool also joins the graph through one
    zero-weighted term (`_touch_routed_parameters`), so every data-parallel rank has a gradient for the same
    parameters in every step whatever its clips picked (encoders that got no window, layers skipped by layerdrop,
    SpecAugment's mask embedding): DDP runs with `find_unused_parameters=False` and FSDP2's reduce-scatter of the
    unit holding the pool has the same tensors on every rank.
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
        self.weak_specs = [encoder_family(c).frame_spec(c) for c in weak_configs]
        self.weak_encoders = nn.ModuleList(encoder_family(c).build(c) for c in weak_configs)
        self.weak_projections = nn.ModuleList(
            nn.Linear(encoder_family(c).hidden_size(c), config.weak_hidden_size) for c in weak_configs
        )
        num_weak = len(weak_configs)
        self.router_independent = DataIndependentRouter(num_weak) if "data_independent" in self.routers else None
        self.router_dependent = (
            DataDependentRouter(self.base_hidden_size, num_weak) if "data_dependent" in self.routers else None
        )
        # Collected by `PreTrainedModel.post_init` of the parent: `device_map="auto"` splits the tower between the
        # encoders' layers, never inside one (each encoder's own `_no_split_modules`, as composite models do).
        self._no_split_modules = sorted(
            {name for encoder in (self.base_encoder, *self.weak_encoders) for name in encoder._no_split_modules or ()}
        )

    @property
    def output_size(self) -> int:
        return self.base_hidden_size + len(self.routers) * self.config.weak_hidden_size

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
            start = self.mel_offsets[front_end["n_mels"]]
            return input_features[:, start : start + front_end["n_mels"]]
        if input_values is None:
            raise ValueError("A waveform encoder needs `input_values` but none were given; use MoWEProcessor.")
        return input_values

    def run_encoder(self, config, encoder, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        family = encoder_family(config)
        dtype = next(encoder.parameters()).dtype
        return family.encode(encoder, inputs.to(dtype), lengths, dynamic=self.config.dynamic_audio_length)

    def _touch_routed_parameters(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` plus 0 x one element of every trainable weak-pool parameter (training only): each gets a (zero)
        gradient even if no window was routed to its encoder. Only the pool: the base encoder runs every step (and
        may be sharded per layer by FSDP2, whose parameters are not to be read outside their layer's forward)."""
        if not (self.training and torch.is_grad_enabled()):
            return hidden
        pool = [*self.weak_encoders.parameters(), *self.weak_projections.parameters()]
        touched = [p.view(-1)[:1].to(hidden.dtype) for p in pool if p.requires_grad]
        if not touched:
            return hidden
        return hidden + 0.0 * torch.cat(touched).sum()

    def forward(
        self,
        input_features: torch.Tensor | None,
        input_values: torch.Tensor | None,
        audio_lengths: torch.Tensor,
    ) -> MoWEAudioFeaturesOutput:
        """
        Args:
            input_features: `(num_windows, sum of distinct n_mels, 3000)` stacked log-mel spectrograms.
            input_values: `(num_windows, num_samples)` 16 kHz waveforms, zero-padded.
            audio_lengths: `(num_windows,)` real samples per window.
        """
        config = self.config
        base_inputs = self.encoder_inputs(config.base_encoder_config, input_features, input_values)
        base_hidden = self.run_encoder(config.base_encoder_config, self.base_encoder, base_inputs, audio_lengths)
        num_windows, num_base_frames = base_hidden.shape[:2]
        valid_frames = num_frames(audio_lengths, self.base_spec).clamp(max=num_base_frames)
        if not self.routers:
            return MoWEAudioFeaturesOutput(last_hidden_state=base_hidden, valid_frames=valid_frames)

        router_logits, selections = self.route(base_hidden, valid_frames)
        blocks = [base_hidden.new_zeros(num_windows, num_base_frames, config.weak_hidden_size) for _ in self.routers]
        for expert in range(len(self.weak_encoders)):
            window_gates = [(index == expert).to(gates.dtype).mul(gates).sum(-1) for _, index, gates in selections]
            chosen = torch.stack([(index == expert).any(-1) for _, index, _ in selections]).any(0)
            rows = chosen.nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            hidden = self.weak_features(expert, rows, input_features, input_values, audio_lengths, num_base_frames)
            hidden = hidden.to(base_hidden.device)
            for r, gate in enumerate(window_gates):
                # `.to(blocks[r].dtype)`: under autocast the projection computes in bf16/fp16 while the blocks keep
                # the base features' dtype (fp32 for fp32 weights), as do the sums over experts.
                weighted = hidden * gate[rows, None, None].to(hidden.dtype)
                blocks[r] = blocks[r].index_add(0, rows, weighted.to(blocks[r].dtype))

        aux_loss = None
        if "data_dependent" in self.routers:
            probs, index, _ = selections[self.routers.index("data_dependent")]
            aux_loss = load_balancing_loss(probs, index)
        hidden = torch.cat([base_hidden, *blocks], dim=-1)
        return MoWEAudioFeaturesOutput(
            last_hidden_state=self._touch_routed_parameters(hidden),
            valid_frames=valid_frames,
            router_logits=torch.stack(router_logits, dim=1),
            router_aux_loss=aux_loss,
            router_indices=torch.stack([index for _, index, _ in selections], dim=1),
            router_gates=torch.stack([gates for _, _, gates in selections], dim=1),
        )

    def route(
        self, base_hidden: torch.Tensor, valid_frames: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Each active router's logits `(num_windows, num_weak)` and its top-k selection `(probs, index, gates)`,
        index and gates `(num_windows, top_k)`, from the base features `(num_windows, T, d_b)`."""
        router_logits, selections = [], []
        for router in self.routers:
            if router == "data_independent":
                logits = self.router_independent(base_hidden.shape[0])
            else:
                logits = self.router_dependent(base_hidden, valid_frames)
            # With `device_map` the routers may sit on another device than the base features: route where they are.
            router_logits.append(logits)
            selections.append(top_k_gates(logits.to(base_hidden.device), self.config.router_top_k))
        return router_logits, selections

    def weak_features(
        self,
        expert: int,
        rows: torch.Tensor,
        input_features: torch.Tensor | None,
        input_values: torch.Tensor | None,
        audio_lengths: torch.Tensor,
        num_base_frames: int,
    ) -> torch.Tensor:
        """Weak encoder `expert` run on the windows `rows` only -> `(len(rows), num_base_frames, weak_hidden_size)`:
        its features moved onto the base frame grid (on the device of `rows`) and projected, not yet gated."""
        weak_config, spec = self.config.weak_encoder_configs[expert], self.weak_specs[expert]
        lengths = audio_lengths.to(rows.device)[rows]
        inputs = self.encoder_inputs(weak_config, input_features, input_values)
        inputs = inputs[rows.to(inputs.device)]
        if inputs.ndim == 2:  # a waveform: only as long as the longest routed window
            inputs = inputs[:, : int(lengths.max())]
        hidden = self.run_encoder(weak_config, self.weak_encoders[expert], inputs, lengths).to(rows.device)
        weak_valid = num_frames(lengths, spec).clamp(max=hidden.shape[1])
        hidden = align_to_frames(hidden, spec, self.base_spec, weak_valid, num_base_frames)
        projection = self.weak_projections[expert]
        return projection(hidden.to(projection.weight.dtype))


class MoWEProjector(nn.Module):
    """Stack `stack_factor` consecutive frames, then Linear -> activation -> Linear into the LLM's hidden size."""

    def __init__(self, config: MoWEConfig, input_size: int):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.stack_factor = config.stack_factor
        self.linear_1 = nn.Linear(input_size * config.stack_factor, hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor, valid_frames: torch.Tensor) -> torch.Tensor:
        """Frames [N, T, D] with `valid_frames` [N] real frames -> the valid audio tokens of all windows, in order,
        [sum_n ceil(valid_frames[n] / stack_factor), hidden_size]. Padded frames are zeroed before stacking, so a
        window's tokens never depend on the batch it came in."""
        num_windows, frames, dim = hidden.shape
        frame_valid = torch.arange(frames, device=hidden.device)[None, :] < valid_frames[:, None]
        hidden = hidden * frame_valid[..., None].to(hidden.dtype)
        pad = -frames % self.stack_factor
        hidden = nn.functional.pad(hidden, (0, 0, 0, pad))
        stacked = hidden.reshape(num_windows, -1, dim * self.stack_factor)
        tokens_per_window = -(-valid_frames // self.stack_factor)
        token_valid = torch.arange(stacked.shape[1], device=hidden.device)[None, :] < tokens_per_window[:, None]
        stacked = stacked[token_valid].to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(stacked)))


def check_audio_inputs(
    input_features: torch.Tensor | None, input_values: torch.Tensor | None, audio_lengths: torch.Tensor | None
) -> None:
    """Raise a `ValueError` for audio inputs that would otherwise end in a torch error or in silent NaN logits:
    missing or negative `audio_lengths`, NaN/Inf features. One device sync for all checks."""
    if audio_lengths is None:
        raise ValueError("`audio_lengths` (real samples per audio window) is required with audio inputs.")
    problems = {
        "`audio_lengths` has negative values; give the real number of samples of each window (>= 0), "
        "as MoWEProcessor returns it.": (audio_lengths < 0).any(),
    }
    for name, values in (("input_features", input_features), ("input_values", input_values)):
        if values is not None:
            problems[
                f"`{name}` contains NaN or Inf values; check the audio (MoWEProcessor rejects NaN/Inf samples) "
                "and any transform applied to the features after it."
            ] = ~torch.isfinite(values).all()
    flags = torch.stack(list(problems.values())).tolist()
    for message, bad in zip(problems, flags):
        if bad:
            raise ValueError(message)


def full_precision_modules(model: MoWEModel, config: MoWEConfig) -> list[str]:
    """Patterns of the modules a quantized load (`from_pretrained(..., quantization_config=...)`) leaves unconverted.

    transformers' quantizers skip `_keep_in_fp32_modules` on top of their own skips (the LM head): here the small,
    freshly trained parts (weak encoders, weak projections, routers, projector), which QLoRA trains in full. The
    frozen base encoder stays unconverted too unless the quantization config lists the modules to skip itself
    (`BitsAndBytesConfig(llm_int8_skip_modules=[...])`, `modules_to_not_convert=[...]`), which, as for any model,
    replaces the default skips. Each pattern matches the module in `MoWEModel` and under any prefix
    (`model.` in `MoWEForConditionalGeneration`). With `dtype=torch.float16`, transformers also loads these modules
    in fp32 (what `_keep_in_fp32_modules` means without quantization).
    """
    tower = model.audio_tower
    names = [f"audio_tower.{name}" for name, child in tower.named_children() if child is not tower.base_encoder]
    names.append("multi_modal_projector")
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        settings = quantization if isinstance(quantization, dict) else vars(quantization)
        if settings.get("llm_int8_skip_modules") is None and settings.get("modules_to_not_convert") is None:
            names.append("audio_tower.base_encoder")
    return [rf"(?:.+\.)?{re.escape(name)}" for name in names]


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
    _skip_keys_device_placement = ["past_key_values"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Every Auto class a user may load this folder with, so `trust_remote_code` finds the code for each.
        self.config.auto_map = {
            "AutoConfig": "configuration_mowe.MoWEConfig",
            "AutoModel": "modeling_mowe.MoWEForConditionalGeneration",
            "AutoModelForMultimodalLM": "modeling_mowe.MoWEForConditionalGeneration",
        }
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
        self._keep_in_fp32_modules = full_precision_modules(self, config)
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
    ) -> tuple | MoWEAudioFeaturesOutput:
        """Encode and project audio windows (arguments: see [`MoWEModel.forward`]). `pooler_output` holds the
        projected audio embeddings `(num_audio_tokens, hidden_size)`; `last_hidden_state` the tower's features."""
        check_audio_inputs(input_features, input_values, audio_lengths)
        audio = self.audio_tower(input_features, input_values, audio_lengths)
        embeds = self.multi_modal_projector(audio.last_hidden_state, audio.valid_frames)
        return MoWEAudioFeaturesOutput(**audio, pooler_output=embeds)  # field order kept for tuple outputs

    def get_placeholder_mask(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, num_audio_tokens: int
    ) -> torch.Tensor:
        """Boolean mask [batch, seq, hidden] of the `<|audio|>` positions; checks their count."""
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
        if int(mask.sum()) != num_audio_tokens:
            raise ValueError(
                f"The text has {int(mask.sum())} audio placeholder tokens but the audio gives {num_audio_tokens} "
                "audio embeddings. Build the inputs with MoWEProcessor, which expands each <|audio|> to its clip's "
                "length (and check that truncation did not cut audio tokens)."
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
            inputs_embeds = self.get_input_embeddings()(input_ids)

        audio_embeds = router_logits = router_aux_loss = router_indices = None
        if input_features is not None or input_values is not None:
            audio = self.get_audio_features(input_features, input_values, audio_lengths, return_dict=True)
            audio_embeds, router_logits = audio.pooler_output, audio.router_logits
            router_aux_loss, router_indices = audio.router_aux_loss, audio.router_indices
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, audio_embeds.shape[0])
            coef = self.config.router_aux_loss_coef
            if router_aux_loss is not None and coef > 0 and torch.is_grad_enabled() and audio_embeds.requires_grad:
                audio_embeds = AddAuxiliaryLoss.apply(audio_embeds, coef * router_aux_loss)
            inputs_embeds = inputs_embeds.masked_scatter(mask, audio_embeds.to(inputs_embeds.device, inputs_embeds.dtype))

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
            router_aux_loss=None if router_aux_loss is None else router_aux_loss.detach(),
            router_indices=router_indices,
        )


class MoWEForConditionalGeneration(MoWEPreTrainedModel, GenerationMixin):
    """MoWE audio LLM with a language-modelling head: `generate()` answers about audio."""

    def __init__(self, config: MoWEConfig):
        super().__init__(config)
        self.model = MoWEModel(config)
        text_config = config.text_config
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        embeddings = self.model.get_input_embeddings()
        embedding_name = next(n for n, m in self.model.language_model.named_modules() if m is embeddings)
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
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
            if outputs.router_aux_loss is not None:
                # The value only: the gradient was injected where the audio entered the LLM (AddAuxiliaryLoss).
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
        itself (see `full_precision_modules`). The parts are composed in `dtype` in CPU memory first.

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
        composed model is quantized, placed and marked (`hf_quantizer`, `is_loaded_in_4bit`) as a saved one would be."""
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


def load_components(
    base_encoder: str | Path | PreTrainedModel,
    weak_encoders: list[str | Path | PreTrainedModel],
    text_model: str | Path | PreTrainedModel,
    dtype: torch.dtype | str | None = None,
) -> tuple[list[nn.Module], PreTrainedModel]:
    """The parts of `MoWEForConditionalGeneration.from_components` loaded (ids and folders; models are kept as
    given): the base then the weak encoders as their family's encoder module, and the `AutoModelForCausalLM`."""

    def load(part, auto_class):
        return part if isinstance(part, PreTrainedModel) else auto_class.from_pretrained(part, dtype=dtype)

    encoders = []
    for part in [base_encoder, *weak_encoders]:
        loaded = load(part, AutoModel)
        encoders.append(encoder_family(loaded.config).from_pretrained_model(loaded))
    return encoders, load(text_model, AutoModelForCausalLM)


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


__all__ = ["MoWEPreTrainedModel", "MoWEModel", "MoWEForConditionalGeneration"]

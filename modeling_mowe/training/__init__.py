"""Fine-tuning MoWE with TRL's SFTTrainer: the data collator, routing statistics and the freezing policy.

Tooling wing: imports the model code, never the other way round (remote code must not need TRL or PEFT).
"""

from __future__ import annotations

import atexit
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..encoders import WaveformEncoderFamily
from ..modeling_mowe import MoWEProjector
from ..processing_mowe import audio_part_data, fill_audio_parts
from ..routing import routing_entropy
from .feature_cache import DEFAULT_MAX_MEMORY_BYTES, FrozenFeatureStore, install_frozen_base_cache

IGNORE_INDEX = -100
AUDIO_COLUMN_REMOVED = (
    "the Trainer removed it as a column the model's forward does not take. Set `remove_unused_columns=False` in the "
    "SFTConfig / TrainingArguments (make_sft_trainer does), so the audio reaches the collator."
)


def _row_messages(row: dict) -> list[dict]:
    """The conversation of a row: `messages`, or conversational / plain `prompt` + `completion`."""
    if "messages" in row and row["messages"] is not None:
        return list(row["messages"])
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str):
            if "audio" not in row:
                raise ValueError(
                    "A row has a plain-text `prompt` and no `audio` column (give `audio: None` for a text-only row): "
                    + AUDIO_COLUMN_REMOVED
                )
            audio_parts = [{"type": "audio"}] * len(_row_audio(row))
            prompt = [{"role": "user", "content": [*audio_parts, {"type": "text", "text": prompt}]}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        return list(prompt) + list(completion)
    raise ValueError("Each row needs `messages`, or `prompt` and `completion`.")


def _row_audio(row: dict) -> list:
    audio = row.get("audio")
    if audio is None:
        return []
    return list(audio) if isinstance(audio, (list, tuple)) else [audio]


class MoWEDataCollator:
    """Turns conversational rows into a training batch for `MoWEForConditionalGeneration`.

    Rows carry an `audio` column (a `datasets` Audio cell, decoded `{"array", "sampling_rate"}` or undecoded
    `{"bytes", "path"}`, or a list of them) and `messages` whose `{"type": "audio"}` parts take the clips in order
    (or `prompt` + `completion`). The batch is the processor's own `apply_chat_template(..., tokenize=True,
    return_assistant_tokens_mask=True)`, so prompts are tokenised exactly as `generate` sees them, and only the
    assistant tokens the chat template marks are trained, its end-of-turn token included (so the model learns to
    stop): prompt, audio and padding labels are -100.

    Returns `input_ids`, `attention_mask`, `labels` [batch, seq] (right-padded) and the audio inputs of every clip
    in row order (`input_features`, `input_values`, `audio_lengths`).

    A row without a trainable token (no assistant turn, or an answer that `max_length` cuts away) is refused with a
    `ValueError` that names it, rather than skipped: skipping would hide a data error (and change the batch size
    under the Trainer), while the fix (filter the dataset, raise `max_length`) is the user's to choose. Such a row
    trains nothing, and a batch of only such rows has a mean loss of 0/0 (the model returns 0 for it, not NaN).
    """

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length

    def _row_conversation(self, row: dict) -> list[dict]:
        """The row's messages with each data-less `{"type": "audio"}` part holding its clip (in order; the
        processor reads each at its own sampling rate)."""
        clips = _row_audio(row)
        queue = list(clips)
        messages = fill_audio_parts(_row_messages(row), queue)
        if any(_needs_clip(part) for message in messages for part in _parts(message)):
            if "audio" not in row:
                raise ValueError(
                    "A row has {'type': 'audio'} parts without data and no `audio` column: " + AUDIO_COLUMN_REMOVED
                )
            raise ValueError(
                f"A row's messages have more audio parts than its {len(clips)} audio clip(s); "
                "give one clip per {'type': 'audio'} part."
            )
        if queue:
            raise ValueError(
                f"A row has {len(clips)} audio clip(s) but only {len(clips) - len(queue)} audio part(s) in its "
                "messages; add one {'type': 'audio'} part per clip."
            )
        return messages

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.processor.apply_chat_template(
            [self._row_conversation(row) for row in rows],
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "right"},
        )
        masks = batch.pop("assistant_masks")
        batch["labels"] = batch["input_ids"].masked_fill(masks == 0, IGNORE_INDEX)
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            if (batch["input_ids"][:, self.max_length :] == self.processor.audio_token_id).any():
                raise ValueError(
                    f"max_length={self.max_length} would cut audio tokens of a row of "
                    f"{batch['input_ids'].shape[1]} tokens; raise max_length or shorten the audio."
                )
            for key in ("input_ids", "attention_mask", "labels"):
                batch[key] = batch[key][:, : self.max_length]
        self._check_every_row_trains(rows, masks, batch["labels"])
        return dict(batch)

    def _check_every_row_trains(self, rows, masks, labels) -> None:
        """Refuse a row whose labels are all -100 (see the class docstring)."""
        for index, row_labels in enumerate(labels):
            if (row_labels != IGNORE_INDEX).any():
                continue
            if masks[index].any():
                reason = f"max_length={self.max_length} cut its answer away"
                fix = "Raise max_length or shorten the prompt"
            else:
                reason = "it has no assistant turn with text (the chat template marks no answer token)"
                fix = "Give the row an assistant answer"
            raise ValueError(
                f"Row {index} of the batch ({_row_summary(rows[index])}) has no answer token to train on (every "
                f"label is -100): {reason}. {fix}, or drop such rows from the dataset before training (e.g. with "
                "`dataset.filter`)."
            )


def _row_summary(row: dict, width: int = 80) -> str:
    """The start of a row's conversation as `role: text` turns, to name the row in an error."""
    try:
        messages = _row_messages(row)
    except ValueError:
        return repr(row)[:width]
    turns = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else message
        if isinstance(content, (list, tuple)):
            content = " ".join(
                part.get("text", "") if part.get("type") == "text" else f"<{part.get('type')}>"
                for part in content if isinstance(part, dict)
            )
        role = message.get("role", "?") if isinstance(message, dict) else "?"
        turns.append(f"{role}: {content}")
    summary = " | ".join(turns)
    return repr(summary if len(summary) <= width else summary[: width - 3] + "...")


def _parts(message: dict) -> list:
    content = message.get("content")
    return list(content) if isinstance(content, (list, tuple)) else []


def _needs_clip(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "audio" and audio_part_data(part) is None


class RoutingStatsCallback(TrainerCallback):
    """Logs how often each router picked each weak encoder (fraction of windows), how sure each router is (the mean
    entropy of its distribution over the pool, in nats: log(pool size) when uniform, 0 when certain) and the mean
    balancing loss.

    Keys: `routing/<router>/<index>_<family>`, `routing/<router>/entropy` and `routing/aux_loss`, averaged over the
    training forwards since the previous log. They go into the Trainer's logs, so they reach
    `trainer.state.log_history`, TensorBoard, W&B, ... like any metric (install with
    `add_routing_stats_callback(trainer)` so it runs before the reporters).
    """

    def __init__(self):
        self._handle = None
        self._counts = None
        self._entropy_sum = None
        self._windows = 0
        self._aux_sum = 0.0
        self._forwards = 0
        self._names: list[str] = []
        self._routers: tuple[str, ...] = ()

    def _record(self, tower: nn.Module, inputs, output) -> None:
        if not tower.training or output.router_indices is None:
            return
        num_weak = len(tower.config.weak_encoder_configs)
        counts = torch.nn.functional.one_hot(output.router_indices.detach(), num_weak).sum(dim=(0, 2)).cpu()  # [R, E]
        self._counts = counts if self._counts is None else self._counts + counts
        entropy = routing_entropy(output.router_logits.detach()).sum(0).cpu()  # [R]
        self._entropy_sum = entropy if self._entropy_sum is None else self._entropy_sum + entropy
        self._windows += output.router_logits.shape[0]
        if output.router_aux_loss is not None:
            self._aux_sum += float(output.router_aux_loss.detach())
            self._forwards += 1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tower = model.get_encoder(modality="audio") if model is not None else None
        if tower is None or not tower.routers or self._handle is not None:
            return
        self._routers = tuple(tower.routers)
        self._names = [
            f"routing/{router}/{i}_{cfg.model_type}"
            for router in tower.routers
            for i, cfg in enumerate(tower.config.weak_encoder_configs)
        ]
        self._handle = tower.register_forward_hook(self._record)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._counts is None or logs is None or "loss" not in logs:
            return
        fractions = self._counts / self._counts.sum(-1, keepdim=True).clamp(min=1)
        stats = {name: round(float(f), 4) for name, f in zip(self._names, fractions.reshape(-1))}
        for router, entropy in zip(self._routers, self._entropy_sum / max(self._windows, 1)):
            stats[f"routing/{router}/entropy"] = round(float(entropy), 4)
        if self._forwards:
            stats["routing/aux_loss"] = round(self._aux_sum / self._forwards, 4)
        logs.update(stats)
        if state.log_history:
            state.log_history[-1].update(stats)
        self._counts, self._entropy_sum, self._windows, self._aux_sum, self._forwards = None, None, 0, 0.0, 0

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def add_routing_stats_callback(trainer) -> RoutingStatsCallback:
    """Install a `RoutingStatsCallback` first in line, so reporting callbacks (TensorBoard, W&B) see its keys."""
    callback = RoutingStatsCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def trainable_module_names(model: nn.Module, train_weak_encoders: bool = True) -> list[str]:
    """Names, relative to their owner, of the modules MoWE trains in full: the audio tower's parts other than its base
    encoder (each weak encoder, unless `train_weak_encoders=False`, and its projection, the routers) and the base
    model's parts other than the audio tower and the LLM (the projector). The base encoder stays frozen; the LLM takes
    LoRA or stays frozen."""
    tower, language_model = model.get_encoder(modality="audio"), model.get_decoder()
    names = []
    for name, child in tower.named_children():
        if child is not tower.base_encoder and (train_weak_encoders or child is not tower.weak_encoders):
            names += [f"{name}.{i}" for i in range(len(child))] if isinstance(child, nn.ModuleList) else [name]
    owner = model.base_model
    names += [name for name, child in owner.named_children() if child is not tower and child is not language_model]
    return names


# Parts of a weak encoder that stay frozen when fine-tuning, by `model_type`: the waveform models' conv feature
# encoder, as wav2vec2/HuBERT recipes do (`freeze_feature_encoder`): its backward over raw 16 kHz samples costs more
# than the rest of a small encoder.
FROZEN_IN_TRAINING: dict[str, tuple[str, ...]] = {
    model_type: ("feature_extractor",) for model_type in WaveformEncoderFamily.model_types
}


def freeze_for_training(
    model: nn.Module,
    train_language_model: bool = False,
    train_base_encoder: bool = False,
    train_weak_encoders: bool = True,
) -> dict[str, int]:
    """The freezing policy without PEFT: base encoder frozen (unless `train_base_encoder`), weak pool (unless
    `train_weak_encoders=False`: specialists that must keep what they learned, or a pool cached like the base) +
    weak projections + routers + projector trainable (but for the `FROZEN_IN_TRAINING` parts, e.g. HuBERT's conv
    feature encoder), the LLM and its head trainable only if `train_language_model`. Returns trainable / total
    counts."""
    model.requires_grad_(False)
    trainable = trainable_module_names(model, train_weak_encoders)
    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in trainable):
            module.requires_grad_(True)
    tower = model.get_encoder(modality="audio")
    for config, encoder in zip(tower.config.weak_encoder_configs, tower.weak_encoders):
        for name in FROZEN_IN_TRAINING.get(config.model_type, ()):
            getattr(encoder, name).requires_grad_(False)
    if train_language_model:
        model.get_decoder().requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
    if train_base_encoder:
        tower.base_encoder.requires_grad_(True)
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }


def learning_rate_groups(model: nn.Module, learning_rate: float, fresh_learning_rate: float) -> list[dict]:
    """Optimizer parameter groups: the trainable parts that start from scratch in a MoWE model (the routers, the
    weak projections and the projector's window summary) at `fresh_learning_rate`, every other trainable parameter at
    `learning_rate`. For a model without any of them (base-only, no window summary) there is one group."""
    tower = model.get_encoder(modality="audio")
    # By type, not by path: a PEFT-wrapped model nests the projector deeper.
    summaries = [m.window_summary for m in model.modules() if isinstance(m, MoWEProjector)]
    candidates = (tower.router_independent, tower.router_dependent, tower.weak_projections, *summaries)
    fresh_modules = [m for m in candidates if m is not None]
    fresh_ids = {id(p) for m in fresh_modules for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in fresh_ids], "lr": learning_rate},
        {"params": [p for p in trainable if id(p) in fresh_ids], "lr": fresh_learning_rate},
    ]
    return [g for g in groups if g["params"]]


def exit_distributed_process(exit_code: int = 0) -> None:
    """End a data-parallel rank (`torchrun`, multi-process `accelerate launch`) whose work is done: destroy the
    process group, run the `atexit` handlers (logging, W&B) while Python is whole, flush and leave with `os._exit`,
    skipping the interpreter's and the C++ runtime's teardown. Without a process group it does nothing (the process
    goes on to exit normally).

    Why: with torch 2.13 on CPU, a `DistributedDataParallel` model keeps its gloo process group and that group's
    threads alive after `destroy_process_group`, even once the model is freed. A two-rank run then aborted in its
    teardown about one time in ten ("terminate called without an active exception"), after all its work: 5 of 51
    runs of a 20-line PyTorch-only DDP script, and 0 of 80 that ended this way.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.destroy_process_group()
    atexit._run_exitfuncs()  # CPython's own: no public way runs the handlers without the interpreter's teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def set_fresh_learning_rate(trainer, fresh_learning_rate: float) -> None:
    """Give `trainer` its own optimizer (`args.optim`: fused AdamW by default) over `learning_rate_groups`: the
    fresh parts (`learning_rate_groups`) at `fresh_learning_rate`, the rest at `args.learning_rate`, no weight decay.
    Call before `trainer.train()`, which then keeps it (and builds its scheduler over both groups)."""
    from transformers import Trainer

    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k != "lr"} | {"weight_decay": 0.0}
    groups = learning_rate_groups(trainer.model, trainer.args.learning_rate, fresh_learning_rate)
    trainer.optimizer = optimizer_cls(groups, **optimizer_kwargs)


def lora_config(
    model: nn.Module, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05, train_weak_encoders: bool = True,
    **kwargs,
):
    """A PEFT `LoraConfig` for the MoWE policy: LoRA on every linear layer of the LLM (and nowhere in the audio
    encoders, whose attention layers share names like `q_proj`), the weak pool (unless `train_weak_encoders=False`),
    its projections, routers and projector trained in full and saved with the adapter (`modules_to_save`). Pass it as
    `SFTTrainer(peft_config=...)`."""
    from peft import LoraConfig

    language_model = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is language_model)
    leaf_names = sorted(
        {name.rsplit(".", 1)[-1] for name, m in language_model.named_modules() if isinstance(m, nn.Linear)}
    )
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=rf"(.*\.)?{re.escape(prefix)}\..*\.({'|'.join(leaf_names)})",
        modules_to_save=trainable_module_names(model, train_weak_encoders),
        task_type="CAUSAL_LM",
        **kwargs,
    )


def make_sft_trainer(
    model: nn.Module,
    processor,
    training_args,
    train_dataset,
    eval_dataset=None,
    use_lora: bool = False,
    lora_r: int = 16,
    train_language_model: bool = False,
    train_base_encoder: bool = False,
    train_weak_encoders: bool = True,
    callbacks: list | None = None,
    cache_frozen_base: bool | FrozenFeatureStore | None = None,
    frozen_base_cache_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
):
    """TRL's `SFTTrainer`, set up for MoWE (a `MoWESFTTrainer`, whose loss holds the routers' balancing loss): our
    collator (TRL detects only image columns), no dataset preparation or column removal (the collator reads
    `audio` + `messages`), the freezing policy or LoRA (`train_weak_encoders=False` keeps the weak pool frozen, its
    projections trained), routing stats, and the frozen base encoder's features cached per clip, with those of a
    frozen weak pool (`cache_frozen_base`: None = where exact, the default; True; False; or a `FrozenFeatureStore`),
    up to `frozen_base_cache_bytes` in memory, the rest spilled to `<output_dir>/_frozen_base_features` (see
    `feature_cache.install_frozen_base_cache`).

    A quantized model (`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))`) trains
    as QLoRA: PEFT's `prepare_model_for_kbit_training` (with `training_args.gradient_checkpointing`, on by default
    in `SFTConfig`), LoRA on the LLM, and the weak pool, routers and projector trained in full; trainable weights in
    fp32."""
    from .sft_trainer import MoWESFTTrainer

    quantized = getattr(model, "is_quantized", False)
    if quantized:
        check_quantized_training(use_lora, train_language_model, train_base_encoder)
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs or {"use_reentrant": False},
        )
        for module in model.modules():
            # bitsandbytes (0.50) repacks a 4-bit layer for its fast CPU kernel at its first eval forward without
            # gradients (an evaluation, a `generate`); that kernel has no backward, so later training steps would
            # silently lose the gradient through every repacked layer. A model being trained keeps the plain path.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    training_args.remove_unused_columns = False
    training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    peft_config = lora_config(model, r=lora_r, train_weak_encoders=train_weak_encoders) if use_lora else None
    if not use_lora:
        freeze_for_training(model, train_language_model, train_base_encoder, train_weak_encoders)
    trainer = MoWESFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=MoWEDataCollator(processor, max_length=training_args.max_length),
        peft_config=peft_config,
        callbacks=callbacks,
    )
    if quantized:
        # TRL stores every trainable parameter of a quantized model in bf16 (the QLoRA paper's adapters). Trainable
        # weights stay fp32 here, as without quantization: `bf16=True` computes in bf16 under autocast either way,
        # the optimizer updates fp32 weights, and a reloaded adapter (PEFT loads it in fp32) gives the same logits.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    add_routing_stats_callback(trainer)
    install_frozen_base_cache(trainer, cache_frozen_base, frozen_base_cache_bytes)
    return trainer


def check_quantized_training(use_lora: bool, train_language_model: bool, train_base_encoder: bool) -> None:
    """Raise a `ValueError` for training settings a quantized model cannot train with (quantized weights have no
    gradient): it trains as QLoRA, `use_lora=True`, and only LoRA and the full-precision parts learn."""
    if not use_lora:
        raise ValueError(
            "The model is quantized, and quantized weights cannot be trained: pass use_lora=True (QLoRA: LoRA on the "
            "LLM, the weak pool, routers and projector trained in full), or load the model without "
            "quantization_config."
        )
    if train_language_model or train_base_encoder:
        raise ValueError(
            "train_language_model / train_base_encoder train quantized weights in full, which cannot be done: with "
            "use_lora=True the LLM learns through LoRA; load the model without quantization_config to train "
            "the LLM or the base encoder in full."
        )

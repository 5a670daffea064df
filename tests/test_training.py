"""Fine-tuning with TRL's SFTTrainer: collator labels, routing stats, loss falls, resume, LoRA, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_clip

from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration, MoWEProcessor
from modeling_mowe.training import IGNORE_INDEX, MoWEDataCollator, lora_config, make_sft_trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "hub_configs" / "mowe-tiny-random"


@pytest.fixture(scope="module")
def splits(benchmark_dir):
    import datasets

    return datasets.load_from_disk(str(benchmark_dir))


@pytest.fixture
def processor():
    return MoWEProcessor.from_pretrained(TINY)


def tiny_model(seed: int = 0, **overrides) -> MoWEForConditionalGeneration:
    torch.manual_seed(seed)
    return MoWEForConditionalGeneration(MoWEConfig.from_pretrained(TINY, **overrides))


def sft_args(output_dir, **overrides):
    from trl import SFTConfig

    defaults = dict(
        output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=2, learning_rate=3e-3,
        logging_steps=1, save_strategy="no", report_to="none", bf16=False, seed=0, data_seed=0,
        gradient_checkpointing=False, disable_tqdm=True, lr_scheduler_type="constant", warmup_steps=0,
        dataloader_pin_memory=False,
    )
    return SFTConfig(**{**defaults, **overrides})


def train_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_labels_cover_assistant_tokens_only(splits, processor):
    rows = [splits["train"][i] for i in range(3)]
    batch = MoWEDataCollator(processor)(rows)
    assert batch["labels"].shape == batch["input_ids"].shape
    for i, row in enumerate(rows):
        trained = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX]
        assert processor.tokenizer.decode(trained) == row["answer"] + "<|im_end|>"  # the end of turn, not after
        audio_positions = batch["input_ids"][i] == processor.audio_token_id
        assert audio_positions.any() and (batch["labels"][i][audio_positions] == IGNORE_INDEX).all()
        padding = batch["attention_mask"][i] == 0
        assert (batch["labels"][i][padding] == IGNORE_INDEX).all()


def test_collated_prompt_is_what_generate_sees(splits, processor):
    """The tokens before the answer equal the processor's chat template with a generation prompt."""
    import numpy as np

    from modeling_mowe.data import load_audio

    row = splits["train"][0]
    batch = MoWEDataCollator(processor)([row])
    wave, rate = load_audio(row["audio"])
    messages = [dict(row["messages"][0], content=[{"type": "audio", "audio": wave, "sampling_rate": rate},
                                                   {"type": "text", "text": row["prompt"]}])]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    n = prompt["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, :n], prompt["input_ids"][0])
    assert (batch["labels"][0, :n] == IGNORE_INDEX).all() and (batch["labels"][0, n] != IGNORE_INDEX)
    assert np.allclose(batch["input_features"].numpy(), prompt["input_features"].numpy(), atol=1e-5)


def test_collator_rejects_clip_part_mismatch(splits, processor):
    row = dict(splits["train"][0])
    row["audio"] = [row["audio"], row["audio"]]
    with pytest.raises(ValueError, match="audio clip"):
        MoWEDataCollator(processor)([row])


def chat_row(answer: str | None) -> dict:
    """A one-clip chat row; `answer=None` leaves out the assistant turn."""
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What is it?"}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"audio": {"array": make_clip(0.5), "sampling_rate": 16_000}, "messages": messages}


def test_collator_refuses_a_row_without_an_answer_and_names_it(processor):
    # Such a row trains nothing; a batch of them would have no trainable token at all.
    with pytest.raises(
        ValueError,
        match=r"Row 1 of the batch \('user: <audio> What is it\?'\) has no answer token "
        r"to train on .*no assistant turn.* Give the row an assistant answer, or drop",
    ):
        MoWEDataCollator(processor)([chat_row("a dog"), chat_row(None)])


def test_collator_refuses_a_row_whose_answer_max_length_cuts_away(processor):
    row = chat_row("a dog barking twice")
    labels = MoWEDataCollator(processor)([row])["labels"][0]
    answer_start = int((labels != IGNORE_INDEX).nonzero()[0])
    assert MoWEDataCollator(processor, max_length=answer_start + 1)([row])["labels"].ne(IGNORE_INDEX).sum() == 1
    with pytest.raises(ValueError, match=rf"Row 0 .*max_length={answer_start} cut its answer away\. Raise max_length"):
        MoWEDataCollator(processor, max_length=answer_start)([row])


def test_rows_whose_audio_column_was_removed_are_told_to_keep_it(splits, processor, tmp_path):
    from trl import SFTTrainer

    # What column removal does:
    rows = [{k: v for k, v in splits["train"][i].items() if k != "audio"} for i in range(2)]
    with pytest.raises(ValueError, match=r"no `audio` column.*`remove_unused_columns=False`"):
        MoWEDataCollator(processor)(rows)
    # A plain SFTTrainer keeps no column of these rows, and transformers' Trainer names the same fix.
    trainer = SFTTrainer(
        model=tiny_model(), args=sft_args(tmp_path, dataset_kwargs={"skip_prepare_dataset": True}),
        train_dataset=splits["train"].select(range(2)), processing_class=processor,
        data_collator=MoWEDataCollator(processor),
    )
    assert trainer.args.remove_unused_columns  # the default
    with pytest.raises(ValueError, match=r"`remove_unused_columns=False`"):
        next(iter(trainer.get_train_dataloader()))


def test_prompt_completion_rows(splits, processor):
    row = splits["train"][0]
    batch = MoWEDataCollator(processor)(
        [{"audio": row["audio"], "prompt": row["prompt"], "completion": row["answer"]}]
    )
    trained = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert processor.tokenizer.decode(trained).startswith(row["answer"])


def test_prompt_completion_rows_without_their_audio_column_are_refused_not_trained_as_text(splits, processor):
    row = splits["train"][0]
    collator = MoWEDataCollator(processor)
    with pytest.raises(ValueError, match=r"no `audio` column.*`remove_unused_columns=False`"):
        collator([{"prompt": row["prompt"], "completion": row["answer"]}])
    text_only = collator([{"audio": None, "prompt": row["prompt"], "completion": row["answer"]}])
    assert processor.audio_token_id not in text_only["input_ids"][0].tolist()
    assert "input_features" not in text_only or text_only["input_features"] is None


def test_sft_learns_with_checkpointing_and_logs_routing(splits, processor, tmp_path):
    args = sft_args(tmp_path, max_steps=10, gradient_checkpointing=True)
    trainer = make_sft_trainer(
        tiny_model(), processor, args, splits["train"].select(range(8)), train_language_model=True
    )
    trainer.train()
    losses = train_losses(trainer)
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses
    routed = [h for h in trainer.state.log_history if "routing/data_dependent/0_whisper" in h]
    assert routed, "routing statistics missing from log_history"
    dependent = [v for k, v in routed[-1].items() if k.startswith("routing/data_dependent/") and "entropy" not in k]
    assert len(dependent) == 4 and abs(sum(dependent) - 1.0) < 1e-3
    assert "routing/aux_loss" in routed[-1] and "routing/data_independent/entropy" in routed[-1]
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert not any("base_encoder" in n for n in trainable) and any("language_model" in n for n in trainable)


def test_resume_continues_the_same_loss_curve(splits, processor, tmp_path):
    data = splits["train"].select(range(12))
    full = make_sft_trainer(tiny_model(), processor, sft_args(tmp_path / "full"), data)
    full.train()

    first = make_sft_trainer(
        tiny_model(), processor, sft_args(tmp_path / "resumed", max_steps=6, save_strategy="steps", save_steps=3), data
    )
    first.train()
    resumed = make_sft_trainer(tiny_model(seed=1), processor, sft_args(tmp_path / "resumed"), data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    resumed_steps = [h["step"] for h in resumed.state.log_history if "loss" in h]
    assert resumed_steps == [1, 2, 3, 4, 5, 6]
    assert torch.allclose(torch.tensor(train_losses(resumed)), torch.tensor(train_losses(full)), atol=1e-5)


def test_lora_model_saves_loads_and_merges_with_same_generation(splits, processor, tmp_path):
    from peft import PeftModel

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model().save_pretrained(base_dir)
    model = MoWEForConditionalGeneration.from_pretrained(base_dir)
    args = sft_args(tmp_path / "run", max_steps=6, gradient_checkpointing=True)
    trainer = make_sft_trainer(model, processor, args, splits["train"].select(range(8)), use_lora=True, lora_r=8)
    trainer.train()
    losses = train_losses(trainer)
    assert losses[-1] < losses[0], losses
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n and "language_model" in n for n in trainable)
    assert not any("base_encoder" in n for n in trainable)
    assert not any("lora_" in n and "audio_tower" in n for n in trainable)
    assert any("router_dependent" in n for n in trainable) and any("multi_modal_projector" in n for n in trainable)
    trainer.save_model(str(adapter_dir))
    saved = set(json.loads((adapter_dir / "adapter_config.json").read_text())["modules_to_save"])
    assert {"multi_modal_projector", "router_dependent", "weak_encoders.0"} <= saved

    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("router_dependent" in k for k in keys) and any("lora_A" in k for k in keys)

    loaded = PeftModel.from_pretrained(MoWEForConditionalGeneration.from_pretrained(base_dir), adapter_dir).eval()
    row = splits["test"][0]
    prompt = processor.apply_chat_template(
        row["messages"][:1], audio=[row["audio"]], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )
    gen = dict(max_new_tokens=6, do_sample=False)
    before = loaded.generate(**prompt, **gen)
    trained_state = {k: v.clone() for k, v in trainer.model.state_dict().items() if "router_dependent" in k}
    loaded_state = {k: v for k, v in loaded.state_dict().items() if "router_dependent" in k}
    assert trained_state.keys() == loaded_state.keys()
    assert all(torch.equal(trained_state[k], loaded_state[k]) for k in trained_state)
    merged = loaded.merge_and_unload()
    assert torch.equal(merged.generate(**prompt, **gen), before)


# Run first in a child process: bitsandbytes' `has_avx512bf16()` answers True, as on a CPU with AVX512-BF16, the CPUs
# where bitsandbytes looks for the `kernels` package on import and warns when it is absent.
AS_ON_AN_AVX512_BF16_CPU = """
import importlib.abc, importlib.machinery, sys

class AnswerAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module
        def exec_module(module):
            load(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, AnswerAvx512Bf16())
"""
KERNELS_WARNING = "Failed to load CPU gemm_4bit_forward"


def run_as_on_an_avx512_bf16_cpu(code: str) -> str:
    """stdout + stderr of `code` run on the simulated CPU; it ends by saying whether bitsandbytes was imported."""
    code += "\nimport sys\nprint('bitsandbytes imported:', 'bitsandbytes' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", AS_ON_AN_AVX512_BF16_CPU + code], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def bitsandbytes_warns_on_the_simulated_cpu():
    pytest.importorskip("bitsandbytes")
    # Imported on its own there, bitsandbytes does warn (`kernels` absent, or unable to fetch its kernel offline).
    assert KERNELS_WARNING in run_as_on_an_avx512_bf16_cpu("import bitsandbytes")


@pytest.mark.parametrize(
    "command",
    [
        "import modeling_mowe.training",
        "import runpy, sys; sys.argv = ['train_sft.py', '--help']\n"
        "try:\n    runpy.run_path('examples/train_sft.py', run_name='__main__')\nexcept SystemExit:\n    pass",
    ],
    ids=["import_training", "train_sft_help"],
)
def test_training_commands_print_no_bitsandbytes_kernels_warning(bitsandbytes_warns_on_the_simulated_cpu, command):
    # PEFT < 0.22 imports bitsandbytes with the Trainer; with PEFT >= 0.22 a QLoRA run loads it later. Either way it
    # comes after modeling_mowe, whose filter must then hold.
    output = run_as_on_an_avx512_bf16_cpu(command + "\nimport bitsandbytes")
    assert "bitsandbytes imported: True" in output
    assert KERNELS_WARNING not in output
    if "--help" in command:
        assert "--load_in_4bit" in output


def test_lora_targets_only_the_language_model():
    config = lora_config(tiny_model(), r=4)
    from peft import get_peft_model

    peft_model = get_peft_model(tiny_model(), config)
    lora_modules = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert lora_modules and all(".language_model." in n for n in lora_modules)


@pytest.mark.slow
def test_two_process_ddp_ends_with_identical_weights(benchmark_dir, tmp_path):
    """torchrun, 2 gloo ranks, the Trainer's own DDP choice (with gradient checkpointing: find_unused_parameters=False,
    which sparse routing survives because the tower gives every weak-pool parameter a gradient each step)."""
    script = tmp_path / "ddp_run.py"
    script.write_text(
        f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {str(ROOT / "examples")!r})
import train_sft

build = train_sft.build_trainer
def build_and_snapshot(*args, **kwargs):
    trainer = build(*args, **kwargs)
    trainer.initial = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    return trainer
train_sft.build_trainer = build_and_snapshot

trainer = train_sft.main(sys.argv[1:])
trained = [p.detach() for p in trainer.model.parameters() if p.requires_grad]
flat = torch.cat([p.reshape(-1) for p in trained])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if dist.get_rank() == 0:
    diff = max((g - gathered[0]).abs().max().item() for g in gathered)
    changed = max((a - b).abs().max().item() for a, b in zip(trained, trainer.initial))
    open({str(tmp_path / "result.txt")!r}, "w").write(f"{{dist.get_world_size()}} {{diff}} {{changed}}")
train_sft.exit_distributed_process()
"""
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
        "--dataset", str(benchmark_dir), "--output_dir", str(tmp_path / "out"), "--max_steps", "3",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--bf16", "False", "--report_to", "none",
        "--save_strategy", "no", "--gradient_checkpointing", "True", "--dataloader_pin_memory", "False",
        "--disable_tqdm", "True",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    world, diff, changed = (tmp_path / "result.txt").read_text().split()
    assert int(world) == 2
    assert float(diff) == 0.0
    assert float(changed) > 0.0


def test_bf16_with_checkpointing_trains(splits, processor, tmp_path):
    """The GPU recipe's flags (bf16 weights and autocast, gradient checkpointing) run; on CPU via `use_cpu`."""
    model = tiny_model().to(torch.bfloat16)
    args = sft_args(tmp_path, max_steps=2, bf16=True, use_cpu=True, gradient_checkpointing=True)
    trainer = make_sft_trainer(model, processor, args, splits["train"].select(range(4)), use_lora=True, lora_r=4)
    trainer.train()
    losses = train_losses(trainer)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert next(p for n, p in trainer.model.named_parameters() if "base_encoder" in n).dtype == torch.bfloat16


def test_collator_works_in_spawned_dataloader_workers(splits, processor):
    """Audio decoding and feature extraction run in 2 `DataLoader` worker processes (spawned: the collator is pickled
    into them, as with `dataloader_num_workers=2` on macOS/Windows) and give the in-process batches."""
    from torch.utils.data import DataLoader

    rows = splits["train"].select(range(4))
    collator = MoWEDataCollator(processor)
    loader = DataLoader(rows, batch_size=2, collate_fn=collator, num_workers=2, multiprocessing_context="spawn")
    in_workers = list(loader)
    in_process = [collator([rows[i] for i in range(start, start + 2)]) for start in (0, 2)]
    assert len(in_workers) == 2
    for got, expected in zip(in_workers, in_process):
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), key


def test_freezing_policy_trains_the_pool_but_the_waveform_encoders_conv_stack():
    from modeling_mowe.training import freeze_for_training

    model = tiny_model()
    freeze_for_training(model)
    tower = model.model.audio_tower
    assert not any(p.requires_grad for p in tower.base_encoder.parameters())
    for config, encoder in zip(tower.config.weak_encoder_configs, tower.weak_encoders):
        conv_stack = encoder.feature_extractor if config.model_type == "hubert" else None
        trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
        assert any(n.startswith(("layers.", "encoder.layers.")) for n in trainable), config.model_type
        if conv_stack is not None:
            assert not any(p.requires_grad for p in conv_stack.parameters())


def test_sft_trainer_loss_holds_the_balancing_loss_scaled_like_the_lm_loss(splits, processor, tmp_path):
    """TRL's SFTTrainer computes the LM loss itself (fused LM head); `make_sft_trainer`'s trainer adds the balancing
    loss to it, and with gradient accumulation (`num_items_in_batch` over n micro-batches) both terms shrink by n."""
    model = tiny_model(seed=3)
    trainer = make_sft_trainer(model, processor, sft_args(tmp_path), splits["train"].select(range(4)))
    batch = trainer.data_collator([splits["train"][i] for i in range(4)])
    router = model.model.audio_tower.router_dependent.classifier
    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    model.train()

    def router_grads(coef: float, accumulation: int = 1) -> torch.Tensor:
        model.config.router_aux_loss_coef = coef
        trainer.current_gradient_accumulation_steps = accumulation
        model.zero_grad()
        torch.manual_seed(0)  # the same sampled routing
        items = None if accumulation == 1 else torch.tensor(accumulation * tokens)
        trainer.compute_loss(model, dict(batch), num_items_in_batch=items).backward()
        return router.weight.grad.clone()

    torch.manual_seed(0)
    aux = model.model.audio_tower(batch["input_features"], batch.get("input_values"), batch["audio_lengths"])
    aux_grad = torch.autograd.grad(aux.router_aux_loss, router.weight)[0]
    assert float(aux_grad.abs().max()) > 1e-4
    with_aux = router_grads(0.5)
    torch.testing.assert_close(with_aux - router_grads(0.0), 0.5 * aux_grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(router_grads(0.5, accumulation=4), with_aux / 4, atol=1e-7, rtol=1e-4)


def test_fresh_parts_are_found_in_a_lora_wrapped_model_too():
    """`learning_rate_groups` on a PEFT model (the demo with a pretrained LLM): the routers, weak projections and a
    window summary in the fresh group, wherever the wrapper nests them."""
    from peft import get_peft_model

    from modeling_mowe.training import learning_rate_groups, lora_config

    model = tiny_model(projector_window_summary=True)
    wrapped = get_peft_model(model, lora_config(model))
    _, fresh = learning_rate_groups(wrapped, 1e-4, 3e-2)
    tower = model.model.audio_tower
    expected = [*tower.router_dependent.parameters(), *tower.router_independent.parameters(),
                *tower.weak_projections.parameters(), *model.model.multi_modal_projector.window_summary.parameters()]
    assert {id(p) for p in fresh["params"]} == {id(p) for p in expected if p.requires_grad}


def test_fresh_learning_rate_keeps_the_trainers_optimizer_with_a_rate_for_the_fresh_parts(splits, processor, tmp_path):
    """The demo's MoWE arms train the routers and weak projections at their own rate, with the optimizer the Trainer
    would build (fused AdamW by default, as the base-only arm gets), and the Trainer keeps it."""
    from transformers import Trainer

    from modeling_mowe.training import set_fresh_learning_rate

    trainer = make_sft_trainer(tiny_model(), processor, sft_args(tmp_path, max_steps=2, learning_rate=1e-4),
                               splits["train"].select(range(4)))
    set_fresh_learning_rate(trainer, 3e-2)
    optimizer = trainer.optimizer
    expected_cls, expected_kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    assert type(optimizer) is expected_cls and optimizer.defaults.get("fused") == expected_kwargs.get("fused")
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    tower = trainer.model.model.audio_tower
    assert {rates[id(p)] for p in tower.router_dependent.parameters()} == {3e-2}
    assert {rates[id(p)] for p in tower.weak_projections.parameters()} == {3e-2}
    assert {rates[id(p)] for p in trainer.model.model.multi_modal_projector.parameters()} == {1e-4}
    assert len(rates) == sum(1 for p in trainer.model.parameters() if p.requires_grad)
    before = [p.detach().clone() for p in tower.router_dependent.parameters()]
    trainer.train()
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer  # accelerate wraps, not replaces
    assert any(not torch.equal(a, p) for a, p in zip(before, tower.router_dependent.parameters()))

"""MoWE at the paper's proportions, and the DDP policy for sparse routing: ratios measured in one run.

    .venv/bin/python benchmarks/bench_paper_shape.py [--repeats 45] [--ddp-steps 9] [--threads 1] [--skip-ddp]

1. MoWE / base-only train step where base : weak : LLM parameters follow Whisper-large-v3 encoder : Whisper-tiny
   encoder : Llama-3-8B (about 0.64 B : 8.2 M : 8.0 B), all three scaled down by one factor, trained as the recipe
   trains: base encoder frozen, LoRA (r 16) on every linear layer of the LLM, weak pool + routers + projector in full,
   and stepped as `Trainer` steps by default (gradients clipped to `max_grad_norm`, then its default optimizer:
   fused AdamW). MoWE: 4 weak encoders, top-1, both routers (one process: weak encoders no clip picked do not run);
   base-only: `router_type="none"`. CPU time of this process, medians of 45 interleaved rounds (with 15, the ratio
   moved by up to 0.04 between runs on a quiet machine); the quartiles of the per-round ratios give the spread. Goal
   <= 1.03x; the FLOP floor is 1.012x (the weak encoders and a wider projector input, next to a frozen base and the
   LLM).
2. DDP on 2 gloo ranks (one thread each), same model, each rank its own clips (so the ranks route differently):
   the tower's idle calls of unpicked weak encoders (0.5 s of one clip, weighted zero) +
   `find_unused_parameters=False`, vs no idle calls + `find_unused_parameters=True` (DDP walks the autograd graph
   after each forward to find unused parameters). Wall time (the ranks wait on each other), medians of interleaved
   steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_model import make_inputs, whisper_config
from timing import interleaved_seconds, median_seconds, print_ratio_table
from transformers import LlamaConfig

from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
# Parameters of the full-size parts (encoders without decoders; Llama-3-8B with its embeddings).
PAPER = {"base": 637e6, "weak": 8.2e6, "llm": 8.03e9}


def paper_config(router_type: str = "both") -> MoWEConfig:
    """Base Whisper d 256 x 6 layers, weak Whisper d 32 x 1 layer, Llama d 768 x 9 layers (GQA 12:4, FFN 3.5x as
    Llama-3): about 1/120 of the paper's parts, in their proportions (printed by `main`)."""
    return MoWEConfig(
        base_encoder_config=whisper_config(256, 6, 4, 128),
        weak_encoder_configs=[whisper_config(32, 1, 2, 80) for _ in range(4)],
        text_config=LlamaConfig(
            vocab_size=640, hidden_size=768, intermediate_size=2688, num_hidden_layers=9,
            num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False,
        ),
        router_type=router_type,
        router_top_k=1,
        weak_hidden_size=128,
        audio_token_id=639,
        dynamic_audio_length=True,
    )


def recipe_model(router_type: str, seed: int = 0):
    """The model as the recipe trains it: LoRA on the LLM (PEFT), base frozen, weak pool/routers/projector in full."""
    from peft import get_peft_model

    from modeling_mowe.training import lora_config

    torch.manual_seed(seed)
    model = MoWEForConditionalGeneration(paper_config(router_type))
    return get_peft_model(model, lora_config(model, r=16)).train()


def train_step(model, inputs: dict, labels: torch.Tensor):
    """One step as `Trainer` takes it with its defaults (`TrainingArguments()`): forward and backward, gradients
    clipped to `max_grad_norm`, then its default optimizer (`optim="adamw_torch_fused"` with torch >= 2.8: one
    fused AdamW kernel over all parameter tensors, where a for-loop AdamW pays per tensor, and MoWE trains 229
    tensors to base-only's 130)."""
    # Imported here, after modeling_mowe: the Trainer imports bitsandbytes (through PEFT), whose CPU-kernel warning
    # modeling_mowe keeps off the console.
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(learning_rate=1e-4, report_to="none")
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_cls(params, **optimizer_kwargs)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**inputs, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()

    return step


def bench_train_step(repeats: int, seconds: list[float]) -> tuple[float, str]:
    steps = {}
    for router_type in ("none", "both"):
        model = recipe_model(router_type)
        inputs, labels = make_inputs(model.config, seconds)
        steps[router_type] = train_step(model, inputs, labels)
    times = interleaved_seconds(steps, repeats)
    median = {name: statistics.median(t) for name, t in times.items()}
    quartiles = statistics.quantiles([b / a for a, b in zip(times["none"], times["both"])], n=4)
    note = (
        f"base-only {median['none'] * 1e3:.0f} ms, MoWE {median['both'] * 1e3:.0f} ms; per-round ratios "
        f"{quartiles[0]:.3f}-{quartiles[2]:.3f} (quartiles of {repeats})"
    )
    return median["both"] / median["none"], note


def ddp_worker(steps: int, seconds: list[float]) -> None:
    """One DDP rank: both policies on the same weights, steps interleaved; rank 0 prints the medians as JSON."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from modeling_mowe.training import exit_distributed_process

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    arms = {}
    for name, idle_calls in (("idle_calls", True), ("find_unused", False)):
        model = recipe_model("both")
        if not idle_calls:
            tower = model.base_model.model.model.audio_tower
            tower.idle_calls = "never"  # the model is in train mode already: no `train()` decides it again
        ddp = DistributedDataParallel(model, find_unused_parameters=not idle_calls)
        inputs, labels = make_inputs(model.config, seconds[rank::2], seed=rank)
        arms[name] = train_step(ddp, inputs, labels)
    times = median_seconds(arms, steps, clock=time.perf_counter)
    if rank == 0:
        print(json.dumps(times))
    exit_distributed_process()


def bench_ddp_policy(steps: int, seconds: list[float]) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--ddp-worker", "--ddp-steps", str(steps)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    times = json.loads(result.stdout.strip().splitlines()[-1])
    note = f"idle calls {times['idle_calls'] * 1e3:.0f} ms, find_unused {times['find_unused'] * 1e3:.0f} ms per step"
    return times["find_unused"] / times["idle_calls"], note


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=45)
    parser.add_argument("--ddp-steps", type=int, default=9)
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="1 by default: on a loaded machine, more threads spin-wait and inflate CPU time",
    )
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats must be at least 2: the per-round ratios' quartiles need two rounds")
    seconds = [2.0, 3.0]
    torch.set_num_threads(args.threads)
    if args.ddp_worker:
        ddp_worker(args.ddp_steps, seconds)
        return

    model = MoWEForConditionalGeneration(paper_config())
    tower = model.model.audio_tower
    sizes = {
        "base": count(tower.base_encoder),
        "weak": count(tower.weak_encoders[0]),
        "llm": count(model.model.language_model) + count(model.lm_head),
    }
    shape = ", ".join(
        f"{k} {v / 1e6:.2f} M ({v / sizes['base']:.4g}x base; paper {PAPER[k] / PAPER['base']:.4g}x)"
        for k, v in sizes.items()
    )
    rows = []
    ratio, note = bench_train_step(args.repeats, seconds)
    rows.append(("MoWE / base-only train step (LoRA, base frozen)", ratio, "<= 1.03", ratio <= 1.03, note))
    if not args.skip_ddp:
        ratio, note = bench_ddp_policy(args.ddp_steps, seconds)
        rows.append(("DDP step: find_unused=True / idle calls", ratio, "(info)", None, note))

    header = f"torch {torch.__version__}, {torch.get_num_threads()} threads; clips {seconds} s; {shape}"
    print_ratio_table(rows, header, precision=3)


if __name__ == "__main__":
    main()

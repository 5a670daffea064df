"""Full-size presets on one GPU, random weights in bf16: MoWE vs base-only SFT step, and `generate` throughput.

    .venv/bin/python benchmarks/bench_gpu.py [--preset hub_configs/mowe-llama3-8b-4x-whisper-tiny] [--steps 3]

(`scripts/gpu_check.sh` runs it for both paper presets.) Per arm, MoWE (the preset's routers) and base-only
(`router_type="none"`): the model is built on the device in bf16 with random weights, trained as the recipe trains
(base encoder frozen, LoRA r 16 on the LLM, weak pool + routers + projector in full, gradient checkpointing on as in
`SFTConfig()`, AdamW), one warm-up step then the median of `--steps` timed steps; peak device memory of the step.
Then `generate` (greedy, a fixed number of new tokens) with the MoWE model: new tokens per second.
Prints ratios MoWE / base-only and writes them as JSON (`--output`). `--device cpu` with the tiny preset checks the
script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from bench_model import make_inputs

from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(preset: str, router_type: str | None, device: torch.device):
    from peft import get_peft_model

    from modeling_mowe.training import lora_config

    overrides = {"router_type": router_type} if router_type else {}
    config = MoWEConfig.from_pretrained(preset, **overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = MoWEForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return get_peft_model(model, lora_config(model, r=16)).train()


def to_device(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def measure_step(preset: str, router_type: str | None, device: torch.device, seconds: list[float], steps: int) -> dict:
    model = build(preset, router_type, device)
    inputs, labels = make_inputs(model.config, seconds)
    inputs, labels = to_device(inputs, device), labels.to(device)
    inputs["input_features"] = inputs["input_features"].to(torch.bfloat16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps + 1):
        synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None  # none measured on CPU
    result = {"step_s": statistics.median(times[1:]), "peak_gib": peak}
    if router_type is None:
        result["generate_tokens_per_s"] = measure_generate(model.get_base_model().eval(), inputs, device)
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


@torch.no_grad()
def measure_generate(model, inputs: dict, device: torch.device, new_tokens: int = 64) -> float:
    prompt = {k: v for k, v in inputs.items() if k != "labels"}
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.generate(**prompt, max_new_tokens=2, do_sample=False)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(**prompt, **kwargs)
    synchronize(device)
    generated = (out.shape[1] - prompt["input_ids"].shape[1]) * out.shape[0]
    return generated / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="hub_configs/mowe-llama3-8b-4x-whisper-tiny")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    seconds = [5.0 + 5.0 * (i % 4) for i in range(args.batch_size)]  # 5-20 s clips
    mowe = measure_step(args.preset, None, device, seconds, args.steps)
    base = measure_step(args.preset, "none", device, seconds, args.steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    figures = {
        "preset": args.preset, "device": name, "batch": args.batch_size, "clips_s": seconds,
        "mowe": mowe, "base_only": base,
        "step_time_ratio": mowe["step_s"] / base["step_s"],
        "peak_memory_ratio": mowe["peak_gib"] / base["peak_gib"] if device.type == "cuda" else None,
    }
    memory = (f"peak memory {figures['peak_memory_ratio']:.3f}x ({mowe['peak_gib']:.1f} vs {base['peak_gib']:.1f} GiB)"
              if device.type == "cuda" else "peak memory not measured on CPU")
    print(json.dumps(figures, indent=2))
    print(
        f"{Path(args.preset).name} on {name}: MoWE / base-only step time {figures['step_time_ratio']:.3f}x "
        f"({mowe['step_s']:.2f} s vs {base['step_s']:.2f} s), {memory}, generate "
        f"{mowe['generate_tokens_per_s']:.1f} new tokens/s (batch {args.batch_size})"
    )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()

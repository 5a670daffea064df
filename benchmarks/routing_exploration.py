"""Do the routers explore? Per-encoder usage and routing entropy over a short SFT run, deterministic top-k against
sampled (Gumbel) top-k in training, on the tiny preset (random weights) and the synthetic benchmark.

    python benchmarks/routing_exploration.py --steps 40

Prints, per mode and router, how many of the pool's weak encoders were ever selected, the selection fractions over
the run, and the routing entropy (nats) at the first and last logged step, from `RoutingStatsCallback`'s logs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration, MoWEProcessor
from modeling_mowe.data import BenchmarkConfig, build_benchmark
from modeling_mowe.training import make_sft_trainer

TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "mowe-tiny-random"


def run(sampling: bool, steps: int, train, seed: int, out: Path) -> dict:
    from trl import SFTConfig

    torch.manual_seed(seed)
    config = MoWEConfig.from_pretrained(TINY, dynamic_audio_length=True, router_sampling=sampling)
    model = MoWEForConditionalGeneration(config)
    args = SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=1,
        save_strategy="no", report_to="none", bf16=False, seed=seed, data_seed=seed, disable_tqdm=True,
        lr_scheduler_type="constant", warmup_steps=0, dataloader_pin_memory=False, use_cpu=True,
    )
    trainer = make_sft_trainer(model, MoWEProcessor.from_pretrained(TINY), args, train, train_language_model=True)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "routing/aux_loss" in h]
    summary = {}
    for router in config.active_routers:
        keys = sorted(k for k in logs[0] if k.startswith(f"routing/{router}/") and "entropy" not in k)
        usage = [sum(h[k] for h in logs) / len(logs) for k in keys]
        ever = sum(any(h[k] > 0 for h in logs) for k in keys)
        entropy = [h[f"routing/{router}/entropy"] for h in logs]
        summary[router] = {"encoders_ever_selected": ever, "mean_usage": [round(u, 3) for u in usage],
                           "entropy_first": entropy[0], "entropy_last": entropy[-1]}
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        splits = build_benchmark(Path(tmp) / "bench", BenchmarkConfig(train_per_task=16, validation_per_task=0,
                                                                       test_per_task=0), progress=False)
        results = {
            mode: run(mode == "sampled", args.steps, splits["train"], args.seed, Path(tmp) / mode)
            for mode in ("deterministic", "sampled")
        }
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

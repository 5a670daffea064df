"""The frozen-base feature cache and short log-mels: ratios measured in one run, on CPU.

    .venv/bin/python benchmarks/bench_feature_cache.py [--clips-per-task 2] [--batch-size 2] [--shapes demo paper]

1. A 3-epoch fine-tune through `make_sft_trainer` (TRL's SFTTrainer, espeak benchmark clips, `dynamic_audio_length`),
   with the frozen base's features cached (`cache_frozen_base=True`) and without: CPU time of epoch 1 (the cache
   fills) and of epochs 2-3 (served from it), per arm, one torch thread, after a one-step warm-up run. Shapes,
   random weights:
   - demo: Whisper-base (d 512, 6 layers) base, 4 x Whisper-tiny.en (d 384, 4 layers) pool, top-1, both routers, the
     demo's from-scratch Llama (d 256, 4 layers) trained in full;
   - paper: `bench_paper_shape.paper_config` (Whisper-large-v3 : tiny : Llama-3-8B proportions at 1/120), LoRA r 16.
2. Collation of 16 clips (`MoWEDataCollator`, the demo's processor), and feature extraction alone: 30 s log-mels vs
   only the longest clip's, interleaved, median CPU time of 21.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_model import whisper_config  # noqa: E402
from bench_paper_shape import paper_config  # noqa: E402

from modeling_mowe import MoWEConfig, MoWEFeatureExtractor, MoWEForConditionalGeneration, MoWEProcessor  # noqa: E402
from modeling_mowe.training import MoWEDataCollator, make_sft_trainer  # noqa: E402

TINY = ROOT / "hub_configs" / "mowe-tiny-random"


def demo_config() -> MoWEConfig:
    return MoWEConfig(
        base_encoder_config=whisper_config(512, 6, 8, 80),
        weak_encoder_configs=[whisper_config(384, 4, 6, 80) for _ in range(4)],
        text_config=LlamaConfig(
            vocab_size=640, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, tie_word_embeddings=True,
        ),
        router_type="both", router_top_k=1, audio_token_id=639, dynamic_audio_length=True,
    )


def processor_for(config: MoWEConfig) -> MoWEProcessor:
    """The preset's tokenizer and chat template (640 tokens, `<|audio|>` = 4) with `config`'s feature extractor."""
    processor = MoWEProcessor.from_pretrained(TINY)
    processor.feature_extractor = MoWEFeatureExtractor.from_mowe_config(config)
    return processor


# transformers.TrainerCallback is reached after modeling_mowe is imported: the Trainer imports bitsandbytes (through
# PEFT), whose CPU-kernel warning modeling_mowe keeps off the console.
class EpochClock(transformers.TrainerCallback):
    """CPU seconds of this process per epoch (one torch thread, no loader workers: on a shared machine CPU time
    moves far less with other jobs' load than wall time)."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_epoch_begin(self, *args, **kwargs):
        self.start = time.process_time()

    def on_epoch_end(self, *args, **kwargs):
        self.seconds.append(time.process_time() - self.start)


def fine_tune(shape: str, cache: bool, rows, batch_size: int, output_dir: str, epochs: int = 3) -> list[float]:
    """CPU seconds of each epoch."""
    from trl import SFTConfig

    config = demo_config() if shape == "demo" else paper_config("both")
    config.audio_token_id = 4
    torch.manual_seed(0)
    model = MoWEForConditionalGeneration(config)
    args = SFTConfig(
        output_dir=output_dir, num_train_epochs=epochs, per_device_train_batch_size=batch_size, logging_steps=10_000,
        save_strategy="no", report_to="none", bf16=False, disable_tqdm=True, dataloader_pin_memory=False,
        max_length=None, seed=0, data_seed=0, learning_rate=1e-4,
    )
    clock = EpochClock()
    trainer = make_sft_trainer(
        model, processor_for(config), args, rows, use_lora=shape == "paper", train_language_model=shape == "demo",
        cache_frozen_base=cache, callbacks=[clock],
    )
    trainer.train()
    return clock.seconds


def collation_seconds(rows, repeats: int = 21) -> dict[str, float]:
    """Median CPU seconds to collate 16 clips, and to extract their features alone, with 30 s log-mels and with the
    longest clip's, interleaved."""
    from modeling_mowe.data import load_audio

    config = demo_config()
    batch = [rows[i % len(rows)] for i in range(16)]
    waves = [load_audio(row["audio"])[0] for row in batch]
    collators = {}
    for length in ("chunk", "longest"):
        processor = processor_for(config)
        processor.feature_extractor = MoWEFeatureExtractor.from_mowe_config(config, log_mel_length=length)
        collators[length] = MoWEDataCollator(processor)
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for length, collator in collators.items():
            start = time.process_time()
            shape = tuple(collator(batch)["input_features"].shape)
            times.setdefault(f"collate, log-mels {length} {shape}", []).append(time.process_time() - start)
            start = time.process_time()
            collator.processor.feature_extractor(waves, sampling_rate=16_000)
            times.setdefault(f"features only, log-mels {length}", []).append(time.process_time() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips-per-task", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=["demo", "paper"], choices=["demo", "paper"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    from modeling_mowe.data import BenchmarkConfig, build_benchmark

    with tempfile.TemporaryDirectory() as tmp:
        bench = BenchmarkConfig(train_per_task=args.clips_per_task, validation_per_task=1, test_per_task=1)
        rows = build_benchmark(Path(tmp) / "bench", bench, progress=False)["train"]
        print(f"torch threads {torch.get_num_threads()}; {len(rows)} clips, batch {args.batch_size}, 3 epochs")
        print("\n16 clips, CPU ms (median of 21):")
        for name, seconds in collation_seconds(rows).items():
            print(f"  {name:45} {seconds * 1000:8.1f}")
        for shape in args.shapes:
            fine_tune(shape, False, rows.select(range(args.batch_size)), args.batch_size, f"{tmp}/warm-up", epochs=1)
            epochs = {cache: fine_tune(shape, cache, rows, args.batch_size, f"{tmp}/{shape}-{cache}")
                      for cache in (False, True)}
            print(f"\n{shape} shape: CPU seconds per epoch (1, 2, 3)")
            for cache, seconds in epochs.items():
                print(f"  {'cached' if cache else 'plain':7} " + "  ".join(f"{s:7.1f}" for s in seconds))
            plain, cached = sum(epochs[False][1:]), sum(epochs[True][1:])
            print(f"  epochs 2-3, plain / cached: {plain / cached:.2f}x faster with the cache")
            print(f"  epoch 1, cached / plain: {epochs[True][0] / epochs[False][0]:.2f}x (the cost of filling it)")


if __name__ == "__main__":
    main()

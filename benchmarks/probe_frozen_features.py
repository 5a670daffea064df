"""Linear probes on frozen encoder features: what each encoder already holds for each task, before MoWE trains on it.
Evidence for which tasks can show MoWE's premise (a pool member knows what the base lacks), and "who knows what".

    python benchmarks/probe_frozen_features.py                                  # emotion and gender, dynamic length
    python benchmarks/probe_frozen_features.py --smart-turn --tasks emotion gender rate
    python benchmarks/probe_frozen_features.py --encoders whisper-tiny.en out/tiny-en-emotion --tasks emotion
    python benchmarks/probe_frozen_features.py --tasks emotion --padded         # also Whisper padded to 30 s (slow)
    python benchmarks/probe_frozen_features.py --tasks gender language rate count emotion same_speaker \
        --encoders whisper-base whisper-tiny.en smart-turn-v3 whisper-tiny.en@emotion whisper-tiny.en@gender \
        whisper-tiny.en@same_speaker --plot docs/who-knows-what.png           # who knows what

`--encoders`: convertible parts by name (`python -m modeling_mowe.convert`'s list: whisper-base, whisper-tiny.en,
smart-turn-v3), encoder folders (any family `encoders.py` supports, e.g. a specialist saved by
`python -m modeling_mowe.training.specialize`), or specialist specs `"<part>@<task>"` as the experiments' pools take
them (`experiments.pools`: the part specialised on this benchmark's training rows of that task, with `--seed`, cached
beside `--cache-dir`); `--smart-turn` adds `smart-turn-v3`. Each encoder reads its own front-end (log-mels of its
size, or the normalised waveform) as MoWE computes it.

For each task: the benchmark's training split (its unseen-voice test split held out; `--train-per-task` and
`--test-per-task` clips), each encoder's last hidden state mean+std pooled over the clip's valid frames
(`training.specialize.pooled_features`), standardised with the training statistics, and a multinomial logistic
regression (L2, full-batch L-BFGS) fitted on the training clips and scored on the test clips. `--finetune-steps N`
also fine-tunes `--finetune-encoder` with a linear head on the same pooled features (AdamW, batch 16; what the
specialisation command trains) and scores that head. Prints one table (accuracy on held-out clips) and writes it as
JSON to `--output`; `--plot` draws it as a heatmap, each task's chance level beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modeling_mowe.data import TASK_LABELS, BenchmarkConfig, build_benchmark
from modeling_mowe.experiments.demo import DemoSettings
from modeling_mowe.experiments.plots import draw_probe_heatmap
from modeling_mowe.experiments.pools import parse_specialist, specialist_folder
from modeling_mowe.modeling_mowe import load_audio_encoder
from modeling_mowe.training.specialize import (
    AudioLabelCollator,
    PooledAudioClassifier,
    encoder_feature_extractor,
    pooled_features,
    resolve_encoder,
)

BATCH = 16


def encode_split(encoder: nn.Module, rows, labels, dynamic: bool) -> torch.Tensor:
    """Pooled features `(len(rows), 2 d)` of the benchmark rows, `BATCH` clips at a time."""
    collator = AudioLabelCollator(encoder_feature_extractor(encoder.config, dynamic), labels, "audio", "answer")
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), BATCH):
            batch = collator([rows[i] for i in range(start, min(start + BATCH, len(rows)))])
            batch.pop("labels")
            out.append(pooled_features(encoder, encoder.config, dynamic=dynamic, **batch))
    return torch.cat(out)


def logistic_probe(train_x, train_y, test_x, num_classes: int, l2: float = 1e-3) -> np.ndarray:
    """Predicted classes of `test_x` [n, d] from an L2-regularised multinomial logistic regression on standardised
    features."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    linear = nn.Linear(train_x.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(linear(train_x), train_y) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return linear(test_x).argmax(-1).numpy()


def finetune_accuracy(source: str, train, test, labels, steps: int, seed: int) -> float:
    """Fine-tune encoder `source` (dynamic length) + a linear head on its pooled features; accuracy on `test`."""
    torch.manual_seed(seed)
    model = PooledAudioClassifier(load_audio_encoder(source), len(labels))
    collator = AudioLabelCollator(encoder_feature_extractor(model.config), labels, "audio", "answer")
    optimizer = torch.optim.AdamW(
        [{"params": model.encoder.parameters(), "lr": 1e-4}, {"params": model.head.parameters(), "lr": 1e-3}],
        weight_decay=0.0,
    )
    model.train()
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch = collator([train[int(i)] for i in rng.choice(len(train), size=min(BATCH, len(train)), replace=False)])
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), BATCH):
            batch = collator([test[i] for i in range(start, min(start + BATCH, len(test)))])
            correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(test)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["emotion", "gender"])
    parser.add_argument(
        "--encoders",
        nargs="+",
        default=["whisper-base", "whisper-tiny.en"],
        help="convertible parts by name, encoder folders, or specialist specs '<part>@<task>'",
    )
    parser.add_argument("--smart-turn", action="store_true", help="also probe Smart Turn v3 (smart-turn-v3)")
    parser.add_argument("--train-per-task", type=int, default=240)
    parser.add_argument("--test-per-task", type=int, default=200)
    parser.add_argument("--padded", action="store_true", help="also probe Whisper padded to 30 s (its training input)")
    parser.add_argument("--finetune-steps", type=int, default=0, help="fine-tune --finetune-encoder this many steps")
    parser.add_argument("--finetune-encoder", default="whisper-tiny.en")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path("outputs/probe/benchmark"))
    parser.add_argument("--output", type=Path, default=Path("outputs/probe/probe.json"))
    parser.add_argument("--plot", type=Path, help="also draw the table as a heatmap (PNG) here")
    parser.add_argument("--specialist-steps", type=int, default=60, help="training steps of each '<part>@<task>'")
    args = parser.parse_args(argv)
    encoders = list(dict.fromkeys([*args.encoders, *(["smart-turn-v3"] if args.smart_turn else [])]))
    torch.manual_seed(args.seed)

    config = BenchmarkConfig(
        seed=args.seed, tasks=tuple(args.tasks), train_per_task=args.train_per_task, validation_per_task=0,
        test_per_task=args.test_per_task,
    )  # fmt: skip
    splits = build_benchmark(args.cache_dir, config, progress=False)
    modes = [("dynamic", True)] + ([("padded", False)] if args.padded else [])
    # A specialist learns from this benchmark's training rows of its task; the held-out voices stay unseen.
    settings = DemoSettings(output_dir=args.cache_dir.parent, seed=args.seed, benchmark=config)
    settings.specialist_recipe["steps"] = args.specialist_steps
    folders = {
        name: specialist_folder(settings, *spec, splits["train"]) if (spec := parse_specialist(name)) else name
        for name in encoders
    }
    loaded = {name: load_audio_encoder(resolve_encoder(folder)).eval() for name, folder in folders.items()}
    results: dict[str, dict[str, float]] = {}
    for task in args.tasks:
        labels = TASK_LABELS[task]
        if not labels:
            raise ValueError(f"Task {task!r} has no class labels to probe (ASR is not a classification task).")
        data = {s: splits[s].filter(lambda t, task=task: t == task, input_columns="task") for s in ("train", "test")}
        targets = {s: torch.tensor([labels.index(a) for a in data[s]["answer"]]) for s in data}
        results[task] = {}
        for name, encoder in loaded.items():
            for mode, dynamic in modes:
                start = time.perf_counter()
                x = {s: encode_split(encoder, data[s], labels, dynamic) for s in data}
                predicted = logistic_probe(x["train"], targets["train"], x["test"], len(labels))
                accuracy = float(np.mean(predicted == targets["test"].numpy()))
                results[task][f"{name} frozen, {mode}"] = accuracy
                print(
                    f"{task:8s} {name} frozen {mode}: {accuracy:.3f} ({time.perf_counter() - start:.0f} s)", flush=True
                )
        if args.finetune_steps:
            start = time.perf_counter()
            source = resolve_encoder(args.finetune_encoder)
            accuracy = finetune_accuracy(source, data["train"], data["test"], labels, args.finetune_steps, args.seed)
            results[task][f"{args.finetune_encoder} fine-tuned {args.finetune_steps} steps, dynamic"] = accuracy
            print(
                f"{task:8s} {args.finetune_encoder} fine-tuned: {accuracy:.3f} ({time.perf_counter() - start:.0f} s)"
            )

    columns = list(dict.fromkeys(c for r in results.values() for c in r))
    print("\n| task | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for task, row in results.items():
        print(f"| {task} | " + " | ".join(f"{row.get(c, float('nan')):.3f}" for c in columns) + " |")
    recorded = vars(args) | {"encoders": encoders, "folders": {n: str(f) for n, f in folders.items()}}
    summary = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in recorded.items()}, "accuracy": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=1))
    if args.plot:
        chance = {task: 1 / len(TASK_LABELS[task]) for task in results}
        draw_probe_heatmap(results, chance, args.plot)
    return summary


if __name__ == "__main__":
    main()

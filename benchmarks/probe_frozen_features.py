"""Linear probes on frozen encoder features: what a frozen base encoder already holds for each task, against a weak
encoder frozen or fine-tuned. Evidence for which tasks can show MoWE's premise (the pool adds what the base lacks).

    python benchmarks/probe_frozen_features.py                              # emotion and gender, dynamic length
    python benchmarks/probe_frozen_features.py --tasks emotion --padded     # also Whisper padded to 30 s (slow)

For each task: the benchmark's training split (unseen-voice test split held out, `--train-per-task` and
`--test-per-task` clips), each encoder's features mean+std pooled over the clip's valid frames, standardised with the
training statistics, and a multinomial logistic regression (L2, full-batch L-BFGS) fitted on the training clips and
scored on the test clips. `--finetune-steps N` also fine-tunes Whisper-tiny.en's encoder with a linear head on the
same pooled features (AdamW, batch 16) and scores that head. Prints one table (accuracy on held-out clips) and writes
it as JSON to `--output`. Encoders are the real converted Whisper checkpoints (`modeling_mowe.convert`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modeling_mowe.data import TASK_LABELS, BenchmarkConfig, build_benchmark, load_audio
from modeling_mowe.encoders import encoder_family
from modeling_mowe.feature_extraction_mowe import MoWEFeatureExtractor


def load_encoder(name: str) -> tuple[nn.Module, object]:
    """The encoder module of a converted Whisper checkpoint (`pretrained_folder(name)`) and its family."""
    from transformers import AutoModel

    from modeling_mowe.convert import pretrained_folder

    model = AutoModel.from_pretrained(pretrained_folder(name))
    family = encoder_family(model.config)
    return family.from_pretrained_model(model).eval(), family


def clip_features(split, extractor: MoWEFeatureExtractor) -> list[dict]:
    """Log-mel features of every clip of `split`, one at a time (`input_features` [1, 80, 3000], lengths [1])."""
    out = []
    for row in split:
        wave, rate = load_audio(row["audio"])
        out.append(dict(extractor(wave, sampling_rate=rate, return_tensors="pt")))
    return out


def pooled(encoder, family, features: dict, dynamic: bool) -> torch.Tensor:
    """Mean and std over the clip's valid frames of the encoder's last hidden state -> [2 * d]."""
    spec, lengths = family.frame_spec(encoder.config), features["audio_lengths"]
    mels = features["input_features"]
    if dynamic:  # the mel frames a dynamic-length encoder reads for this clip
        mels = mels[..., : spec.mel_frames_read(int(lengths[0]))]
    hidden = family.encode(encoder, mels, lengths, dynamic=dynamic)[0]
    valid = int(spec.num_frames(lengths)[0])
    hidden = hidden[: max(1, min(valid, hidden.shape[0]))]
    return torch.cat([hidden.mean(0), hidden.std(0, unbiased=False)])


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


def finetune_accuracy(name: str, train, test, labels, steps: int, seed: int) -> float:
    """Fine-tune encoder `name` (dynamic length) + a linear head on its pooled features; accuracy on `test`."""
    torch.manual_seed(seed)
    encoder, family = load_encoder(name)
    head = nn.Linear(2 * family.hidden_size(encoder.config), len(labels))
    optimizer = torch.optim.AdamW(
        [{"params": encoder.parameters(), "lr": 1e-4}, {"params": head.parameters(), "lr": 1e-3}], weight_decay=0.0
    )
    encoder.train()
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch = rng.choice(len(train), size=min(16, len(train)), replace=False)
        logits = torch.stack([head(pooled(encoder, family, train[i][0], dynamic=True)) for i in batch])
        loss = nn.functional.cross_entropy(logits, torch.tensor([train[i][1] for i in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    encoder.eval()
    with torch.no_grad():
        predictions = [int(head(pooled(encoder, family, f, dynamic=True)).argmax()) for f, _ in test]
    return float(np.mean([p == y for p, (_, y) in zip(predictions, test)]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["emotion", "gender"])
    parser.add_argument("--encoders", nargs="+", default=["whisper-base", "whisper-tiny.en"])
    parser.add_argument("--train-per-task", type=int, default=240)
    parser.add_argument("--test-per-task", type=int, default=200)
    parser.add_argument("--padded", action="store_true", help="also probe Whisper padded to 30 s (its training input)")
    parser.add_argument("--finetune-steps", type=int, default=0, help="fine-tune Whisper-tiny.en for this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path("outputs/probe/benchmark"))
    parser.add_argument("--output", type=Path, default=Path("outputs/probe/probe.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    config = BenchmarkConfig(
        seed=args.seed, tasks=tuple(args.tasks), train_per_task=args.train_per_task, validation_per_task=0,
        test_per_task=args.test_per_task,
    )
    splits = build_benchmark(args.cache_dir, config, progress=False)
    extractor = MoWEFeatureExtractor(front_ends=[{"kind": "log_mel", "n_mels": 80}])
    modes = [("dynamic", True)] + ([("padded", False)] if args.padded else [])
    results: dict[str, dict[str, float]] = {}
    for task in args.tasks:
        labels = TASK_LABELS[task]
        data = {}
        for split in ("train", "test"):
            rows = splits[split].filter(lambda t, task=task: t == task, input_columns="task")
            data[split] = (clip_features(rows, extractor), [labels.index(a) for a in rows["answer"]])
        results[task] = {}
        for name in args.encoders:
            encoder, family = load_encoder(name)
            for mode, dynamic in modes:
                start = time.perf_counter()
                with torch.no_grad():
                    x = {s: torch.stack([pooled(encoder, family, f, dynamic) for f in data[s][0]]) for s in data}
                predicted = logistic_probe(x["train"], torch.tensor(data["train"][1]), x["test"], len(labels))
                accuracy = float(np.mean(predicted == np.asarray(data["test"][1])))
                results[task][f"{name} frozen, {mode}"] = accuracy
                print(f"{task:8s} {name} frozen {mode}: {accuracy:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        if args.finetune_steps:
            train = list(zip(*data["train"]))
            test = list(zip(*data["test"]))
            start = time.perf_counter()
            accuracy = finetune_accuracy("whisper-tiny.en", train, test, labels, args.finetune_steps, args.seed)
            results[task][f"whisper-tiny.en fine-tuned {args.finetune_steps} steps, dynamic"] = accuracy
            print(f"{task:8s} whisper-tiny.en fine-tuned: {accuracy:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)

    columns = list(dict.fromkeys(c for r in results.values() for c in r))
    print("\n| task | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for task, row in results.items():
        print(f"| {task} | " + " | ".join(f"{row.get(c, float('nan')):.3f}" for c in columns) + " |")
    summary = {"settings": vars(args) | {"cache_dir": str(args.cache_dir), "output": str(args.output)},
               "accuracy": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()

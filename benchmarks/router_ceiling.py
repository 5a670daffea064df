"""Can an audio-only router tell which question a clip will be asked? The data-dependent router sees only
`masked_mean_t(H_b)` (DESIGN.md s2), so it can send a task's clips to that task's specialist only as far as the base's
mean features tell that task's clips from the others'.

    python benchmarks/router_ceiling.py --seed 6 --output outputs/router-ceiling/ceiling.json

For the speech tasks (`--tasks`), a multinomial logistic regression (`probe_frozen_features.logistic_probe`) learns
which task a clip belongs to from the router's own input (the base encoder's last hidden state, mean over the clip's
valid frames) and, for comparison, from its mean and standard deviation; fitted on training clips, scored on the
held-out test split (unseen voices and sentences). Per task: the fraction of its test clips recognised as that task
(the most a linear router of that input could send to that task's specialist without also sending it the others'
clips at the same rate); for emotion also per label. Prints the table and writes it as JSON to `--output`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from probe_frozen_features import BATCH, logistic_probe

from modeling_mowe.data import BenchmarkConfig, build_benchmark
from modeling_mowe.modeling_mowe import load_audio_encoder
from modeling_mowe.training.specialize import (
    AudioLabelCollator,
    encoder_feature_extractor,
    pooled_features,
    resolve_encoder,
)

SPEECH_TASKS = ("asr", "gender", "language", "rate", "emotion")


def pooled_split(encoder: torch.nn.Module, rows, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(features, task indices)`: the clips' mean+std pooled base features `(n, 2 d)` and which task each is from."""
    collator = AudioLabelCollator(encoder_feature_extractor(encoder.config), tasks, "audio", "task")
    features, targets = [], []
    with torch.no_grad():
        for start in range(0, len(rows), BATCH):
            batch = collator([rows[i] for i in range(start, min(start + BATCH, len(rows)))])
            targets.append(batch.pop("labels"))
            features.append(pooled_features(encoder, encoder.config, **batch))
    return torch.cat(features), torch.cat(targets)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(SPEECH_TASKS))
    parser.add_argument("--encoder", default="whisper-base", help="the base encoder: a convertible part or a folder")
    parser.add_argument("--train-per-task", type=int, default=240)
    parser.add_argument("--test-per-task", type=int, default=200)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--cache-dir", type=Path, default=Path("outputs/router-ceiling/benchmark"))
    parser.add_argument("--output", type=Path, default=Path("outputs/router-ceiling/ceiling.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    config = BenchmarkConfig(seed=args.seed, tasks=tuple(args.tasks), train_per_task=args.train_per_task,
                             validation_per_task=0, test_per_task=args.test_per_task)
    splits = build_benchmark(args.cache_dir, config, progress=False)
    encoder = load_audio_encoder(resolve_encoder(args.encoder)).eval()
    tasks = list(args.tasks)
    (train_x, train_y), (test_x, test_y) = (pooled_split(encoder, splits[s], tasks) for s in ("train", "test"))
    width = train_x.shape[1] // 2
    answers = np.array(splits["test"]["answer"], dtype=object)
    recall: dict[str, dict[str, float]] = {}
    for inputs, columns in (("mean (the router's input)", slice(0, width)), ("mean+std", slice(None))):
        predicted = logistic_probe(train_x[:, columns], train_y, test_x[:, columns], len(tasks))
        truth = test_y.numpy()
        row = {task: float(np.mean(predicted[truth == i] == i)) for i, task in enumerate(tasks)}
        if "emotion" in tasks:
            emotion = tasks.index("emotion")
            for label in sorted(set(answers[truth == emotion])):
                clips = (truth == emotion) & (answers == label)
                row[f"emotion: {label}"] = float(np.mean(predicted[clips] == emotion))
        row["all clips"] = float(np.mean(predicted == truth))
        recall[inputs] = row

    columns = list(dict.fromkeys(c for row in recall.values() for c in row))
    print("\n| router input | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for inputs, row in recall.items():
        print(f"| {inputs} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    recorded = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    summary = {"settings": recorded, "recognised_as_own_task": recall}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()

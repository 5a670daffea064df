"""Where a cue is lost: linear probes at every stage of a trained MoWE (or base-only) checkpoint, per task.

    python benchmarks/probe_stages.py --model outputs/demo/mowe-model --tasks gender emotion rate
    python benchmarks/probe_stages.py --model outputs/demo/base-only-model --dataset outputs/demo/cache/benchmark/<fp>

Stages, for each clip as the model sees it (the task's prompt, the chat template, one clip per row):
- `base`: the base encoder's last hidden state, mean+std pooled over the clip's valid frames;
- `weak i`: each weak encoder's own last hidden state, pooled the same way (every weak encoder, routed or not);
- `audio tokens`: the projector's output (the LLM's audio embeddings), mean+std over the clip's audio tokens;
- `LLM`: the LLM's last hidden state at the position that predicts the first answer token (the end of the prompt).

A multinomial logistic regression (`probe_frozen_features.logistic_probe`: standardised features, L2, L-BFGS) is fitted
on the training clips and scored on the held-out clips (the benchmark's unseen-voice test split). A stage that scores
well and the next one that does not is where the cue is lost (the projector, the LLM, or the training mix). Prints a
markdown table (accuracy on held-out clips, one row per task) and writes it to `--output` (`.md`, with a `.json`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from probe_frozen_features import logistic_probe

from modeling_mowe.data import TASK_LABELS, TASK_PROMPTS, BenchmarkConfig, build_benchmark, chat_messages, load_audio
from modeling_mowe.encoders import encoder_family
from modeling_mowe.training.specialize import pooled_features


def _mean_std(hidden: torch.Tensor) -> torch.Tensor:
    return torch.cat([hidden.mean(0), hidden.std(0, unbiased=False)])


@torch.no_grad()
def stage_features(model, processor, row: dict) -> dict[str, torch.Tensor]:
    """Every stage's features `{stage: (d,)}` for one benchmark row, as the model sees it."""
    wave, rate = load_audio(row["audio"])
    messages = chat_messages(row["prompt"])
    messages[0]["content"][0] = {"type": "audio", "audio": wave, "sampling_rate": rate}
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    tower, config = model.model.audio_tower, model.config
    features, values, lengths = inputs.get("input_features"), inputs.get("input_values"), inputs["audio_lengths"]

    def pooled(encoder, encoder_config) -> torch.Tensor:
        kind = encoder_family(encoder_config).front_end(encoder_config)["kind"]
        slice_ = tower.encoder_inputs(encoder_config, features, values)
        inputs_ = {"input_features": slice_} if kind == "log_mel" else {"input_values": slice_}
        stats = pooled_features(encoder, encoder_config, lengths, dynamic=config.dynamic_audio_length, **inputs_)
        return stats.mean(0)  # windows of one clip: their average

    out = {"base": pooled(tower.base_encoder, config.base_encoder_config)}
    for i, encoder in enumerate(tower.weak_encoders):
        out[f"weak {i}"] = pooled(encoder, config.weak_encoder_configs[i])
    audio = model.model.get_audio_features(input_features=features, input_values=values, audio_lengths=lengths)
    out["audio tokens"] = _mean_std(audio.pooler_output)
    llm = model(**inputs, output_hidden_states=True)
    out["LLM"] = llm.hidden_states[-1][0, -1]
    return {k: v.float().cpu() for k, v in out.items()}


def probe_stages(model, processor, splits, tasks, train_split: str = "train", test_split: str = "test") -> dict:
    """`{task: {stage: held-out accuracy}}` of a linear probe fitted per task and stage on `train_split` clips."""
    results: dict[str, dict[str, float]] = {}
    for task in tasks:
        labels = TASK_LABELS.get(task)
        if not labels:
            raise ValueError(f"Task {task!r} has no class labels to probe; choose from the classification tasks.")
        data, targets = {}, {}
        for split in (train_split, test_split):
            rows = splits[split].filter(lambda t, task=task: t == task, input_columns="task")
            if len(rows) == 0:
                raise ValueError(f"The {split} split has no rows of task {task!r}; build the benchmark with it.")
            per_row = [stage_features(model, processor, row) for row in rows]
            data[split] = {stage: torch.stack([r[stage] for r in per_row]) for stage in per_row[0]}
            targets[split] = torch.tensor([labels.index(a) for a in rows["answer"]])
        results[task] = {}
        for stage in data[train_split]:
            predicted = logistic_probe(data[train_split][stage], targets[train_split], data[test_split][stage],
                                       len(labels))  # fmt: skip
            results[task][stage] = float(np.mean(predicted == targets[test_split].numpy()))
    return results


def markdown_table(results: dict[str, dict[str, float]], title: str) -> str:
    columns = list(dict.fromkeys(c for r in results.values() for c in r))
    lines = [f"{title}\n", "| task | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for task, row in results.items():
        lines.append(f"| {task} | " + " | ".join(f"{row[c]:.3f}" if c in row else "-" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a saved MoWE folder (its processor beside it)")
    parser.add_argument("--dataset", type=Path, help="a benchmark folder (default: build one with the sizes below)")
    parser.add_argument("--tasks", nargs="+", default=["gender", "emotion", "rate"])
    parser.add_argument("--train-per-task", type=int, default=240)
    parser.add_argument("--test-per-task", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path("outputs/probe/benchmark"))
    parser.add_argument("--output", type=Path, default=Path("outputs/probe/stages.md"))
    args = parser.parse_args(argv)
    from modeling_mowe import MoWEForConditionalGeneration, MoWEProcessor

    if args.dataset is not None:
        import datasets

        splits = datasets.load_from_disk(str(args.dataset))
    else:
        config = BenchmarkConfig(
            seed=args.seed, tasks=tuple(args.tasks), train_per_task=args.train_per_task, validation_per_task=0,
            test_per_task=args.test_per_task,
        )  # fmt: skip
        splits = build_benchmark(args.cache_dir, config, progress=False)
    unknown = [t for t in args.tasks if t not in TASK_PROMPTS]
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown}; the benchmark's tasks are {sorted(TASK_PROMPTS)}.")
    torch.manual_seed(args.seed)
    model = MoWEForConditionalGeneration.from_pretrained(args.model).eval()
    processor = MoWEProcessor.from_pretrained(args.model)
    start = time.perf_counter()
    results = probe_stages(model, processor, splits, args.tasks)
    table = markdown_table(results, f"Linear probes per stage of {args.model} (held-out accuracy)")
    print(table + f"\n({time.perf_counter() - start:.0f} s)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    summary = {"settings": {k: str(v) for k, v in vars(args).items()}, "accuracy": results}
    args.output.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()

"""What the experiments read off trained arms: routing per task, statistics over seeds, verdicts on intervals."""

from __future__ import annotations

import numpy as np
import torch

from ..evaluation import prompt_messages, task_score


def routing_tables(model, processor, dataset, per_task: int = 50) -> dict:
    """Per router and task, over the first `per_task` clips of each task, from one forward each: `"selected"`, the
    fraction of windows the router sent to each weak encoder (rows sum to `router_top_k`), and `"weight"`, its mean
    probability on each (rows sum to 1), which still tells encoders apart when every window selects the whole pool."""
    tower = model.get_encoder(modality="audio")
    tables = {measure: {router: {} for router in tower.routers} for measure in ("selected", "weight")}
    for task in sorted(set(dataset["task"])):
        rows = dataset.filter(lambda t, task=task: t == task, input_columns="task")
        rows = rows.select(range(min(per_task, len(rows))))
        inputs = processor.apply_chat_template(
            [prompt_messages(r) for r in rows], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", padding=True,
        )
        with torch.no_grad():
            output = model(**inputs)
        # router_indices: [windows, routers, top_k] -> one-hot [windows, routers, top_k, weak encoders]
        one_hot = torch.nn.functional.one_hot(output.router_indices, len(tower.weak_encoders))
        selected = one_hot.sum(-2).float().mean(0)  # [routers, weak encoders]
        weight = output.router_logits.float().softmax(-1).mean(0)
        for r, router in enumerate(tower.routers):
            tables["selected"][router][task] = selected[r].tolist()
            tables["weight"][router][task] = weight[r].tolist()
    return tables


def routing_by_task(model, processor, dataset, per_task: int = 50) -> dict:
    """Fraction of test windows each router sent to each weak encoder, per task (rows sum to `router_top_k`), over
    the first `per_task` clips of each task (`routing_tables`' `"selected"`)."""
    return routing_tables(model, processor, dataset, per_task)["selected"]


WER_ROWS = ("asr",)
"""Rows whose metric is a word error rate (lower is better)."""


def difference_verdicts(intervals: dict, reference: str) -> list[str]:
    """One line per row and difference to `reference`: its 95% interval and whether it says better, worse or
    "within noise" (the interval holds zero). WER differences: lower is better."""
    lines = []
    for row, bounds in intervals.items():
        for key, (low, high) in bounds.items():
            if not key.endswith(f" - {reference}"):
                continue
            if low <= 0 <= high:
                verdict = "within noise"
            else:
                verdict = "better" if (high < 0) == (row in WER_ROWS) else "worse"
            lines.append(f"{row:14s} {key}: [{low:+.3f}, {high:+.3f}] {verdict}")
    return lines


def pool_seeds(per_seed: list[dict]) -> dict:
    """One `score_predictions`-shaped result per arm over every seed's clips (per-example scores concatenated in the
    same order for every arm), for a paired bootstrap over (seed, clip)."""
    pooled = {}
    for arm in per_seed[0]:
        tasks = {}
        for task, first in per_seed[0][arm]["tasks"].items():
            pairs = [pair for seed in per_seed for pair in seed[arm]["tasks"][task]["per_example"]]
            value = sum(a for a, _ in pairs) / max(sum(b for _, b in pairs), 1)
            tasks[task] = {"metric": first["metric"], "value": value, "n": len(pairs), "per_example": pairs}
        accuracies = [t["value"] for t in tasks.values() if t["metric"] == "accuracy"]
        pooled[arm] = {"tasks": tasks, "summary": {
            "asr_wer": tasks["asr"]["value"] if "asr" in tasks else None,
            "mean_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
            "average_score": sum(task_score(t) for t in tasks.values()) / len(tasks),
            "n": sum(t["n"] for t in tasks.values()),
        }}
    return pooled


def seed_statistics(per_seed: list[dict], reference: str) -> dict:
    """Per arm and row (each task's metric, and the average score): the values over seeds, their mean and standard
    deviation; for the other arms also the difference to `reference` in each seed and whether it favours the arm in
    every seed (lower WER, higher accuracy)."""
    def values(result: dict) -> dict[str, float]:
        return {**{t: r["value"] for t, r in result["tasks"].items()},
                "average_score": result["summary"]["average_score"]}

    table: dict = {}
    for arm in per_seed[0]:
        rows = [values(seed[arm]) for seed in per_seed]
        table[arm] = {}
        for row in rows[0]:
            v = np.array([r[row] for r in rows])
            entry = {"values": v.round(4).tolist(), "mean": round(float(v.mean()), 4),
                     "sd": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4)}
            if arm != reference:
                diff = v - np.array([values(seed[reference])[row] for seed in per_seed])
                better = diff < 0 if row in WER_ROWS else diff > 0
                entry |= {"differences": diff.round(4).tolist(), "better_in_every_seed": bool(better.all())}
            table[arm][row] = entry
    return table

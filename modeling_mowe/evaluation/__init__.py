"""Scoring of the multi-task benchmark: normalisation, per-task metrics, comparison tables, result files.

`generate_answers` runs a model over a dataset's prompts; everything else works on strings. The metrics are the local
``evaluate`` modules ``metric_wer.py`` and ``metric_accuracy.py`` next to this file, loaded by path (no Hub access).

Result dict of one system, as returned by :func:`score_predictions`::

    {
        "tasks": {
            "asr":    {"metric": "wer", "value": 0.12, "n": 40, "wer": 0.12, "substitutions": 3, ...},
            "gender": {"metric": "accuracy", "value": 0.95, "n": 40, "accuracy": 0.95, "correct": 38, "total": 40},
            ...
        },
        "summary": {"asr_wer": 0.12, "mean_accuracy": 0.9, "average_score": 0.896, "n": 200},
    }

This module belongs to the tooling wing: the model code never imports it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

WER_TASKS = frozenset({"asr"})
"""Tasks scored by word error rate; every other task is scored by exact-match accuracy."""

METRIC_FILES = {"wer": "metric_wer.py", "accuracy": "metric_accuracy.py"}

_APOSTROPHES = "'\u2019\u2018\u02bc`"


def normalize_answer(text: str | None) -> str:
    """The canonical form of an answer or transcript, applied to predictions and references alike.

    Rule: Unicode NFKC; lowercase; apostrophes (``' ’ ‘ ʼ```) deleted (``"don't"`` -> ``"dont"``); every other
    punctuation or symbol character (Unicode categories P* and S*) replaced by a space; whitespace runs collapsed to
    one space; leading/trailing space stripped. Letters with accents and digits are kept (``"Four."`` ->
    ``"four"``, ``"the  Cat, sat!"`` -> ``"the cat sat"``). ``None`` gives ``""``.
    """
    if text is None:
        return ""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = "".join("" if ch in _APOSTROPHES else " " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return re.sub(r"\s+", " ", text).strip()


@functools.cache
def load_metric(name: str):
    """The local ``evaluate`` module ``name`` (``"wer"`` or ``"accuracy"``), loaded by file path, cached.

    Raises:
        ValueError: for another name.
    """
    import evaluate

    if name not in METRIC_FILES:
        raise ValueError(f"Unknown metric {name!r}; the local metrics are {sorted(METRIC_FILES)}.")
    return evaluate.load(str(Path(__file__).resolve().parent / METRIC_FILES[name]))


def metric_for_task(task: str, metrics: Mapping[str, str] | None = None) -> str:
    """`metrics[task]` where given (a mixture's `MixtureConfig.metrics()`), else ``"wer"`` for tasks in
    :data:`WER_TASKS` and ``"accuracy"`` otherwise."""
    if metrics and task in metrics:
        return metrics[task]
    return "wer" if task in WER_TASKS else "accuracy"


def task_score(task_result: Mapping[str, Any]) -> float:
    """A task's result as a higher-is-better number in [0, 1]: accuracy, or ``max(0, 1 - WER)`` for WER tasks."""
    value = float(task_result["value"])
    return max(0.0, 1.0 - value) if task_result["metric"] == "wer" else value


def score_predictions(
    tasks: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[str],
    normalize: bool = True,
    metrics: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Score one system's predictions, per task and overall.

    Args:
        tasks, predictions, references: parallel lists, one entry per example (the ``task`` and ``answer`` columns
            of the benchmark and the generated text).
        normalize: apply :func:`normalize_answer` to predictions and references first.
        metrics: task -> ``"wer"`` or ``"accuracy"`` for tasks not scored by the default rule
            (:func:`metric_for_task`).

    Returns:
        ``{"tasks": {task: {...}}, "summary": {...}}`` (tasks in order of first appearance). Each task entry has
        ``metric`` (``"wer"`` or ``"accuracy"``), ``value`` (that metric), ``n`` (examples) and the metric module's
        own outputs. The summary has:

        - ``asr_wer``: the ``asr`` task's corpus WER (``None`` without ASR examples);
        - ``mean_accuracy``: the unweighted mean of the accuracy tasks' accuracies (``None`` if there are none);
        - ``average_score``: the unweighted mean over all tasks of :func:`task_score` (accuracy, or
          ``max(0, 1 - WER)``), so every task counts once whatever its size;
        - ``n``: the number of examples.

    Raises:
        ValueError: when the three lists differ in length or are empty.
    """
    if not (len(tasks) == len(predictions) == len(references)):
        raise ValueError(
            f"tasks, predictions and references must have one entry per example; got lengths "
            f"{len(tasks)}, {len(predictions)}, {len(references)}."
        )
    if not tasks:
        raise ValueError("Nothing to score: no examples.")
    grouped: dict[str, tuple[list[str], list[str]]] = {}
    for task, prediction, reference in zip(tasks, predictions, references):
        if normalize:
            prediction, reference = normalize_answer(prediction), normalize_answer(reference)
        preds, refs = grouped.setdefault(str(task), ([], []))
        preds.append("" if prediction is None else str(prediction))
        refs.append("" if reference is None else str(reference))

    per_task = {}
    for task, (preds, refs) in grouped.items():
        metric = metric_for_task(task, metrics)
        out = load_metric(metric).compute(predictions=preds, references=refs)
        per_task[task] = {
            "metric": metric, "value": float(out[metric]), "n": len(refs), **out,
            "per_example": per_example_scores(metric, preds, refs),
        }

    accuracies = [r["value"] for r in per_task.values() if r["metric"] == "accuracy"]
    summary = {
        "asr_wer": per_task["asr"]["value"] if "asr" in per_task else None,
        "mean_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
        "average_score": sum(task_score(r) for r in per_task.values()) / len(per_task),
        "n": len(tasks),
    }
    return {"tasks": per_task, "summary": summary}


def per_example_scores(metric: str, predictions: Sequence[str], references: Sequence[str]) -> list[list[int]]:
    """`[numerator, denominator]` per example, such that the task's metric is sum(numerators) / sum(denominators):
    `[word errors, reference words]` for WER (so resampling examples resamples the corpus WER), `[correct, 1]` for
    accuracy. What :func:`bootstrap_intervals` resamples."""
    if metric == "accuracy":
        return [[int(p == r), 1] for p, r in zip(predictions, references)]
    import jiwer

    scores = []
    for prediction, reference in zip(predictions, references):
        out = jiwer.process_words(reference, prediction)
        scores.append(
            [out.substitutions + out.deletions + out.insertions, out.substitutions + out.deletions + out.hits]
        )
    return scores


def bootstrap_intervals(
    results: Mapping[str, Mapping[str, Any]],
    reference: str | None = None,
    samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """Percentile-bootstrap confidence intervals of every task's metric and of the average score, per system, and of
    each system's difference to `reference` (default: the last system).

    The resampling is paired and stratified: each bootstrap sample draws, per task, that task's examples with
    replacement, the same draw for every system (they answered the same examples), so a difference's interval
    reflects how much the two systems disagree, not the spread of each.

    Args:
        results: ``{system: score_predictions(...) result}`` over the same examples in the same order.

    Returns:
        ``{row: {system: [low, high], "<system> - <reference>": [low, high], ...}}`` for each task and
        ``"average_score"``; differences are in the task's metric (WER differences: lower is better).
    """
    import numpy as np

    systems = list(results)
    reference = reference or systems[-1]
    rng = np.random.default_rng(seed)
    tail = (1 - confidence) / 2 * 100
    tasks = list(results[reference]["tasks"])
    intervals: dict[str, dict[str, list[float]]] = {}
    task_scores = {name: [] for name in systems}  # per system: [samples] score arrays, one per task
    for task in tasks:
        n = results[reference]["tasks"][task]["n"]
        draw = rng.integers(0, n, size=(samples, n))
        values = {}
        for name in systems:
            pairs = np.asarray(results[name]["tasks"][task]["per_example"], dtype=float)
            values[name] = pairs[draw, 0].sum(1) / np.maximum(pairs[draw, 1].sum(1), 1)
            is_wer = results[name]["tasks"][task]["metric"] == "wer"
            task_scores[name].append(np.clip(1 - values[name], 0, None) if is_wer else values[name])
        intervals[task] = _percentiles(values, reference, tail)
    averages = {name: np.mean(task_scores[name], axis=0) for name in systems}
    intervals["average_score"] = _percentiles(averages, reference, tail)
    return intervals


def _percentiles(values: Mapping[str, Any], reference: str, tail: float) -> dict[str, list[float]]:
    import numpy as np

    out = {name: np.percentile(v, [tail, 100 - tail]).tolist() for name, v in values.items()}
    for name, v in values.items():
        if name != reference:
            out[f"{name} - {reference}"] = np.percentile(v - values[reference], [tail, 100 - tail]).tolist()
    return out


_SUMMARY_ROWS = (
    ("mean_accuracy", "mean accuracy (↑)", True),
    ("average_score", "average score (↑)", True),
)


def _format(value: float | None, precision: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{precision}f}"


def results_table_markdown(
    results: Mapping[str, Mapping[str, Any]],
    tasks: Sequence[str] | None = None,
    precision: int = 3,
    bold_best: bool = True,
    intervals: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> str:
    """A Markdown table comparing systems side by side: one row per task and summary, one column per system.

    Args:
        results: ``{system name: score_predictions(...) result}``, e.g. ``{"MoWE": ..., "base-only": ...}``; the
            column order follows the mapping.
        tasks: row order (default: tasks in order of first appearance across systems).
        precision: decimals shown.
        bold_best: with two or more systems, bold the best value of each row (lowest WER, highest accuracy).
        intervals: :func:`bootstrap_intervals`' output: each value gets its interval, and each difference it
            holds (``"<system> - <reference>"``) gets a column: the point difference and its interval.

    Returns:
        The table, ending with a newline. Task rows read ``<task> (WER ↓)`` or ``<task> (accuracy ↑)``; then
        ``mean accuracy`` and ``average score`` rows (see :func:`score_predictions`) and an ``examples`` row.
        A system without a task shows ``–``.
    """
    if not results:
        raise ValueError("results is empty: pass {system name: score_predictions(...) output}.")
    systems = list(results)
    if tasks is None:
        tasks = list(dict.fromkeys(t for r in results.values() for t in r.get("tasks", {})))
    differences = [k for k in next(iter(intervals.values()), {}) if " - " in k] if intervals else []

    def with_interval(text: str, key: str, name: str) -> str:
        bounds = (intervals or {}).get(key, {}).get(name)
        return f"{text} [{_format(bounds[0], precision)}, {_format(bounds[1], precision)}]" if bounds else text

    def row(label: str, key: str, values: list[float | None], higher_is_better: bool) -> str:
        cells = [_format(v, precision) for v in values]
        present = [v for v in values if v is not None]
        if bold_best and len(systems) > 1 and present:
            best = max(present) if higher_is_better else min(present)
            cells = [
                f"**{c}**" if v is not None and _format(v, precision) == _format(best, precision) else c
                for c, v in zip(cells, values)
            ]
        cells = [with_interval(c, key, name) for c, name in zip(cells, systems)]
        for difference in differences:
            first, second = difference.split(" - ")
            a, b = values[systems.index(first)], values[systems.index(second)]
            point = "–" if a is None or b is None else f"{a - b:+.{precision}f}"
            cells.append(with_interval(point, key, difference))
        return "| " + " | ".join([label, *cells]) + " |"

    header = systems + [f"{d} (95% CI)" for d in differences]
    lines = ["| task | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for task in tasks:
        metric = metric_for_task(task)
        for result in results.values():
            if task in result.get("tasks", {}):
                metric = result["tasks"][task]["metric"]
                break
        values = [r.get("tasks", {}).get(task, {}).get("value") for r in results.values()]
        label = f"{task} (WER ↓)" if metric == "wer" else f"{task} (accuracy ↑)"
        lines.append(row(label, task, values, higher_is_better=metric != "wer"))
    for key, label, higher in _SUMMARY_ROWS:
        lines.append(row(label, key, [r.get("summary", {}).get(key) for r in results.values()], higher))
    counts = [r.get("summary", {}).get("n") for r in results.values()]
    count_cells = ["–" if n is None else str(n) for n in counts] + [""] * len(differences)
    lines.append("| examples | " + " | ".join(count_cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    results: Mapping[str, Mapping[str, Any]],
    out_dir: str | os.PathLike,
    name: str = "results",
    title: str | None = "MoWE synthetic benchmark (test split)",
    intervals: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.json`` (the results as given) and ``<out_dir>/<name>.md`` (the comparison table).

    Args:
        results: ``{system name: score_predictions(...) result}``.
        out_dir: created if missing.
        name: file stem.
        title: Markdown heading (``None``: no heading).
        intervals: :func:`bootstrap_intervals`' output, shown in the table (see :func:`results_table_markdown`).

    Returns:
        ``{"json": path, "markdown": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
    table = results_table_markdown(results, intervals=intervals)
    if intervals:
        table += (
            "\nIn brackets: 95% percentile-bootstrap intervals (examples resampled per task, the same draw for every "
            "system).\n"
        )
    notes = (
        "\nWER: corpus-level word error rate of the `asr` task (lower is better). Accuracy: exact match after "
        "normalisation (lowercase, punctuation removed, whitespace collapsed). Mean accuracy: unweighted mean over "
        "the accuracy tasks. Average score: unweighted mean over all tasks of accuracy, or max(0, 1 - WER).\n"
    )
    md_path.write_text((f"# {title}\n\n" if title else "") + table + notes, encoding="utf-8")
    return {"json": json_path, "markdown": md_path}


def prompt_messages(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The row's conversation up to its last assistant turn, with the row's audio clips placed in its audio parts
    (`processing_mowe.fill_audio_parts`)."""
    from ..processing_mowe import fill_audio_parts

    messages = list(row["messages"])
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    clips = row.get("audio")
    return fill_audio_parts(messages, list(clips) if isinstance(clips, (list, tuple)) else [clips])


def generate_answers(
    model, processor, dataset, batch_size: int = 16, max_new_tokens: int = 24, progress: bool = True
) -> list[str]:
    """Greedy answers of `model` to every row of `dataset` (rows with `audio` and chat `messages`), in order
    (`handler.generate_replies`, batch by batch).

    Batches are left-padded, so each answer equals the row generated alone.
    """
    from tqdm.auto import tqdm

    from ..handler import generate_replies

    tokenizer = processor.tokenizer
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc="generating", disable=not progress):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            conversations = [prompt_messages(row) for row in rows]
            answers += generate_replies(model, processor, conversations, max_new_tokens=max_new_tokens)
    finally:
        tokenizer.padding_side = padding_side
    return answers


def evaluate_model(
    model, processor, dataset, batch_size: int = 16, progress: bool = True, metrics: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Generate answers for `dataset` and score them per task (see `score_predictions`, which takes `metrics`); the
    result also holds the predictions under ``"predictions"``."""
    predictions = generate_answers(model, processor, dataset, batch_size=batch_size, progress=progress)
    results = score_predictions(dataset["task"], predictions, dataset["answer"], metrics=metrics)
    results["predictions"] = predictions
    return results

"""The study: every router arm against base-only, several seeds, one benchmark (docs/RESULTS.md, "Does the pool
help?").

    python -m modeling_mowe.experiments study --seeds 3
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data import TASKS, BenchmarkConfig, build_benchmark
from ..evaluation import bootstrap_intervals, evaluate_model, results_table_markdown
from ..training.feature_cache import FrozenFeatureStore
from .analysis import difference_verdicts, pool_seeds, seed_statistics
from .demo import DemoSettings, align, build_model, log, prepare_parts, start_from_aligned, train
from .plots import draw_study_plots

STUDY_ARMS = (
    ("base-only", "none"),
    ("MoWE", "both"),
    ("MoWE data-dependent", "data_dependent"),
    ("MoWE data-independent", "data_independent"),
)
"""The study's arms (name, router_type): base-only is the reference; the three MoWE arms are the paper's ablation."""


@dataclass
class StudySettings(DemoSettings):
    """The demo's parts, and the study's protocol (docs/RESULTS.md, "Study protocol")."""

    seeds: int = 3
    steps: int = 200
    test_per_task: int = 200
    tasks: tuple[str, ...] = ()  # () = every task of `data.TASKS`, emotion included
    fresh_learning_rate: float | None = 3e-3
    weak_init_scale: float = 0.1
    data_seed: int = 0


def study_markdown(per_seed: list[dict], statistics: dict, pooled: dict, intervals: dict, reference: str) -> str:
    """The study's report: per-seed tables, mean ± sd over seeds, the pooled table with intervals and verdicts."""
    parts = ["# MoWE study: every arm against base-only, several seeds\n"]
    for seed, results in enumerate(per_seed):
        parts += [f"## Seed {seed}\n", results_table_markdown(results)]
    parts.append(f"## Mean ± sd over seeds (in brackets: the difference to {reference} per seed; ✓ = better in every "
                 "seed)\n")
    arms = list(statistics)
    lines = ["| row | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    for row in statistics[reference]:
        cells = []
        for arm in arms:
            entry = statistics[arm][row]
            cell = f"{entry['mean']:.3f} ± {entry['sd']:.3f}"
            if "differences" in entry:
                cell += " (" + ", ".join(f"{d:+.3f}" for d in entry["differences"]) + ")"
                cell += " ✓" if entry["better_in_every_seed"] else ""
            cells.append(cell)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    parts.append("\n".join(lines) + "\n")
    parts += [f"## Pooled over seeds: paired bootstrap over (seed, clip), differences to {reference}\n",
              results_table_markdown(pooled, intervals=intervals),
              "```\n" + "\n".join(difference_verdicts(intervals, reference)) + "\n```\n"]
    return "\n".join(parts)


def run_study(settings: StudySettings) -> dict:
    """Every arm of `STUDY_ARMS` for `settings.seeds` seeds on one benchmark (the same held-out clips in every seed):
    per seed, a base-only alignment and each arm fine-tuned from it with the same steps, data order and recipe;
    evaluation on the test split; statistics over seeds and a paired bootstrap over clips pooled across seeds."""

    out = settings.output_dir
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bench_config = settings.benchmark or BenchmarkConfig(
        seed=settings.data_seed, tasks=settings.tasks or TASKS, train_per_task=settings.train_per_task,
        validation_per_task=0, test_per_task=settings.test_per_task,
    )
    log(f"study: {settings.seeds} seeds x {len(STUDY_ARMS)} arms, tasks {list(bench_config.tasks)}")
    splits = build_benchmark(out / "cache" / "benchmark", bench_config, progress=False)
    feature_store = FrozenFeatureStore()  # the frozen base encoder's frames, shared by every seed and arm
    per_seed, histories, seconds = [], {}, {}
    for seed in range(settings.seeds):
        seed_settings = dataclasses.replace(settings, seed=seed, output_dir=out / f"seed-{seed}")
        parts = prepare_parts(seed_settings)
        aligned, _ = align(seed_settings, parts, splits["train"], feature_store)
        results = {}
        for name, router_type in STUDY_ARMS:
            log(f"study seed {seed}: {name}")
            model, processor = build_model(seed_settings, parts, router_type)
            start_from_aligned(model, aligned, weak_init_scale=settings.weak_init_scale)
            model, stats = train(
                seed_settings, name, model, processor, splits["train"], settings.steps,
                settings.finetune_learning_rate, feature_store, fresh_learning_rate=settings.fresh_learning_rate,
            )
            if seed == 0 and router_type != "none":
                histories[name] = stats["history"]
            results[name] = evaluate_model(model.eval(), processor, splits["test"], progress=False)
            results[name].pop("predictions")
        per_seed.append(results)
        seconds[f"seed {seed}"] = round(time.perf_counter() - started, 1)
        (out / "per_seed.json").write_text(json.dumps(per_seed))

    reference = STUDY_ARMS[0][0]
    pooled = pool_seeds(per_seed)
    intervals = bootstrap_intervals(pooled, reference=reference, samples=settings.bootstrap_samples, seed=0)
    statistics = seed_statistics(per_seed, reference)
    markdown = study_markdown(per_seed, statistics, pooled, intervals, reference)
    (out / "study.md").write_text(markdown)
    plots = draw_study_plots(pooled, intervals, histories, reference, out)
    print("\n" + markdown, flush=True)
    summary = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items() if k != "benchmark"},
        "benchmark": bench_config.to_dict(), "statistics": statistics, "intervals": intervals,
        "verdicts": difference_verdicts(intervals, reference), "seconds": seconds,
        "files": [str(out / "study.md"), str(out / "per_seed.json"), *map(str, plots)],
    }
    (out / "study.json").write_text(json.dumps(summary, indent=1))
    log(f"study done in {time.perf_counter() - started:.0f} s: {out / 'study.md'}")
    return summary

"""Which recipe choice decides whether the weak pool helps: MoWE against base-only under several fine-tuning recipes,
several seeds, one alignment per seed and task mix shared by every recipe.

    python benchmarks/recipe_ablation.py --seeds 0 1 2 --output-dir outputs/recipe-ablation

The demo's recipe (five tasks, 150 steps, one learning rate, the MoWE projector's weak columns started at zero) and
the study's (six tasks, 200 steps, the fresh routers and weak projections at 3e-3, weak columns started at 0.1 x the
aligned spread) differ in several choices at once. Each recipe in `RECIPES` changes some of them; both arms of a
recipe fine-tune from the same aligned model of their seed, with the same data order, and are scored on the same
held-out clips. Seed S draws its benchmark with data seed S, as `python -m modeling_mowe.cli --seed S` does
(`--data-seed` fixes one draw for every seed, as the study does). A base-only arm depends only on its task mix and
steps, so recipes that share them share that arm. Per recipe: the MoWE - base-only difference per seed and a paired
bootstrap over (seed, clip) pooled across seeds, per task and on the average score; per MoWE arm, which weak encoder
each router picked per task. Every trained arm is saved under `models/` (for `probe_stages.py` and other test sets)
and its results under `per_arm/`, so a rerun continues where an interrupted one stopped; `recipe_ablation.md` holds
the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from modeling_mowe.data import DEFAULT_TASKS, STUDY_TASKS, BenchmarkConfig, build_benchmark
from modeling_mowe.evaluation import evaluate_model, results_table_markdown
from modeling_mowe.experiments.analysis import pool_seeds, routing_by_task, seed_statistics
from modeling_mowe.experiments.demo import (
    DemoSettings,
    align,
    build_model,
    log,
    prepare_parts,
    start_from_aligned,
    train,
)
from modeling_mowe.experiments.study import summarise_split
from modeling_mowe.modeling_mowe import MoWEForConditionalGeneration
from modeling_mowe.processing_mowe import MoWEProcessor
from modeling_mowe.training.feature_cache import FrozenFeatureStore


@dataclass(frozen=True)
class Recipe:
    """One fine-tuning recipe for both arms (the alignment is the seed's, shared)."""

    name: str
    steps: int = 150
    fresh_learning_rate: float | None = None  # the routers and weak projections' rate (None: the arms' one rate)
    weak_init_scale: float = 0.0  # the MoWE projector's weak columns at start, x the aligned columns' spread
    tasks: tuple[str, ...] = DEFAULT_TASKS  # the benchmark's tasks (alignment, fine-tuning and test)


RECIPES = (
    Recipe("demo"),
    Recipe("demo, 200 steps", steps=200),
    Recipe("demo, fresh parts at 3e-3", fresh_learning_rate=3e-3),
    Recipe("demo, weak columns at 0.1", weak_init_scale=0.1),
    Recipe("demo, six tasks (emotion added)", tasks=STUDY_TASKS),
    Recipe("study fine-tuning (200 steps, 3e-3, 0.1)", steps=200, fresh_learning_rate=3e-3, weak_init_scale=0.1),
    Recipe("six tasks, 1000 steps", steps=1000, tasks=STUDY_TASKS),
)


def run_arm(
    settings: DemoSettings, parts, aligned, splits, store, recipe: Recipe, router_type: str, model_dir: Path
) -> dict:
    """Fine-tune one arm, save it to `model_dir` (for later probes and other test sets) and score it."""
    model, processor = build_model(settings, parts, router_type)
    start_from_aligned(model, aligned, weak_init_scale=recipe.weak_init_scale if router_type != "none" else 0.0)
    name = f"{recipe.name} {router_type}"
    model, stats = train(
        settings, name, model, processor, splits["train"], recipe.steps, settings.finetune_learning_rate, store,
        fresh_learning_rate=recipe.fresh_learning_rate if router_type != "none" else None,
    )
    model.eval()
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    result = evaluate_model(model, processor, splits["test"], progress=False)
    result["routing"] = routing_by_task(model, processor, splits["test"]) if router_type != "none" else None
    result["final_losses"] = [h["loss"] for h in stats["history"] if "loss" in h][-5:]
    return result


def score_saved_arm(model_dir: Path, splits) -> dict:
    """A saved arm's results on the far split (voices, rates, beep bands and sentences neither train nor test has)."""
    model = MoWEForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = MoWEProcessor.from_pretrained(model_dir)
    result = evaluate_model(model, processor, splits["far"], progress=False)
    log(f"{model_dir.name}: far split, average score {result['summary']['average_score']:.3f}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/recipe-ablation"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=[r.name for r in RECIPES], help="names from RECIPES")
    parser.add_argument("--align-steps", type=int, default=DemoSettings.align_steps)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale every recipe's steps (tests: tiny)")
    parser.add_argument("--train-per-task", type=int, default=DemoSettings.train_per_task)
    parser.add_argument("--test-per-task", type=int, default=DemoSettings.test_per_task)
    parser.add_argument("--data-seed", type=int, default=None,
                        help="one benchmark draw for every seed (default: seed S draws with data seed S, as the demo)")
    parser.add_argument("--far-per-task", type=int, default=0,
                        help="also score every arm on this many far-split clips per task (data.BenchmarkConfig)")
    parser.add_argument("--arms", nargs="+", choices=("none", "both"), default=["none", "both"],
                        help="router types to train: none (base-only) and both (MoWE); base-only alone is cheap")
    parser.add_argument("--tiny", action="store_true", help="tiny.en in both roles, a one-layer LLM (tests)")
    args = parser.parse_args(argv)
    recipes = [r for r in RECIPES if r.name in args.recipes]
    if len(recipes) != len(args.recipes):
        parser.error(f"--recipes takes names from {[r.name for r in RECIPES]}")
    recipes = [dataclasses.replace(r, steps=max(1, round(r.steps * args.steps_scale))) for r in recipes]
    out = args.output_dir
    (out / "per_arm").mkdir(parents=True, exist_ok=True)
    extra = {}
    if args.tiny:
        extra = {"base_encoder": "whisper-tiny.en", "weak_encoders": ("whisper-tiny.en",) * 2, "batch_size": 4,
                 "scratch_llm": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1}}
    store = FrozenFeatureStore()
    per_arm: dict[tuple[int, str, str], dict] = {}
    for seed in args.seeds:
        aligned = {}  # per task mix: this seed's aligned weights, made on first need
        for recipe in recipes:
            bench = BenchmarkConfig(seed=seed if args.data_seed is None else args.data_seed, tasks=recipe.tasks,
                                    train_per_task=args.train_per_task, validation_per_task=0,
                                    test_per_task=args.test_per_task)
            settings = DemoSettings(output_dir=out / f"seed-{seed}", seed=seed, align_steps=args.align_steps,
                                    benchmark=bench, **extra)
            mix = "" if recipe.tasks == DEFAULT_TASKS else "-" + "+".join(t for t in recipe.tasks
                                                                        if t not in DEFAULT_TASKS)
            for router_type in ("none", "both"):
                # A base-only arm depends only on its task mix and steps: recipes that share them share it.
                key = f"{recipe.steps}-steps{mix}" if router_type == "none" else recipe.name
                stem = f"seed{seed}-{router_type}-{key}".replace(" ", "_").replace("/", "-")
                path = out / "per_arm" / f"{stem}.json"
                if not path.exists() and router_type not in args.arms:
                    continue  # an arm not asked for is reported only when an earlier run saved it
                if not path.exists():
                    splits = build_benchmark(out / "cache" / "benchmark", bench, progress=False)
                    parts = prepare_parts(settings)
                    if recipe.tasks not in aligned:
                        aligned[recipe.tasks], _ = align(settings, parts, splits["train"], store)
                    log(f"seed {seed}: {recipe.name}, {router_type}")
                    result = run_arm(settings, parts, aligned[recipe.tasks], splits, store, recipe, router_type,
                                     out / "models" / stem)
                    path.write_text(json.dumps({**result, "recipe": asdict(recipe), "seed": seed}))
                record = json.loads(path.read_text())
                if args.far_per_task and "far" not in record:
                    far = BenchmarkConfig(**{**bench.to_dict(), "train_per_task": 0, "test_per_task": 0,
                                             "far_per_task": args.far_per_task})
                    record["far"] = score_saved_arm(out / "models" / stem,
                                                    build_benchmark(out / "cache" / "benchmark", far, progress=False))
                    path.write_text(json.dumps(record))
                per_arm[seed, recipe.name, router_type] = record
    report = summarise(per_arm, args.seeds, recipes)
    (out / "recipe_ablation.md").write_text(report["markdown"])
    (out / "recipe_ablation.json").write_text(json.dumps(report["json"], indent=1))
    print(report["markdown"])
    return report["json"]


def summarise(per_arm: dict, seeds: list[int], recipes: list[Recipe]) -> dict:
    """Per recipe and split (test; far where every arm has it): per-seed differences and the pooled paired bootstrap;
    the markdown report and its JSON."""
    lines = ["# Recipe ablation: MoWE - base-only per recipe\n",
             f"Seeds {seeds}; 95 % paired bootstrap over (seed, clip), stratified per task. Average score: mean over "
             "tasks of accuracy or max(0, 1 - WER); WER differences: lower is better.\n"]
    summary = {recipe.name: {} for recipe in recipes}
    splits = ["test"] + (["far"] if all("far" in record for record in per_arm.values()) else [])
    compared = [r for r in recipes if all((s, r.name, "both") in per_arm for s in seeds)]
    lines += _base_only_table(per_arm, seeds, recipes, splits)
    for split in splits if compared else []:
        lines += [f"## {split} split\n",
                  "| recipe | per seed (points) | pooled (points) | " + " | ".join(STUDY_TASKS) + " |",
                  "|---|---|---|" + "---|" * len(STUDY_TASKS)]
        for recipe in compared:
            per_seed = [{arm: _split_result(per_arm[s, recipe.name, router], split)
                         for arm, router in (("MoWE", "both"), ("base-only", "none"))} for s in seeds]
            split_summary = summarise_split(per_seed, "base-only", samples=2000)
            pooled, intervals = split_summary["pooled"], split_summary["intervals"]
            diffs = [r["MoWE"]["summary"]["average_score"] - r["base-only"]["summary"]["average_score"]
                     for r in per_seed]
            pooled_diff = pooled["MoWE"]["summary"]["average_score"] - pooled["base-only"]["summary"]["average_score"]
            low, high = intervals["average_score"]["MoWE - base-only"]
            cells = []
            for task in STUDY_TASKS:
                if task not in pooled["MoWE"]["tasks"]:
                    cells.append("")
                    continue
                value = pooled["MoWE"]["tasks"][task]["value"] - pooled["base-only"]["tasks"][task]["value"]
                t_low, t_high = intervals[task]["MoWE - base-only"]
                cells.append(f"{100 * value:+.1f} [{100 * t_low:+.1f}, {100 * t_high:+.1f}]")
            lines.append(f"| {recipe.name} | " + ", ".join(f"{100 * d:+.1f}" for d in diffs)
                         + f" | **{100 * pooled_diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]** | "
                         + " | ".join(cells) + " |")
            summary[recipe.name][split] = {
                "per_seed_average_differences": diffs, "pooled_average_difference": pooled_diff,
                "intervals": intervals, "pooled": {arm: r["summary"] for arm, r in pooled.items()},
            }
            if split == "test":
                summary[recipe.name]["routing"] = {s: per_arm[s, recipe.name, "both"]["routing"] for s in seeds}
        lines.append("")
    lines.append("Pooled test-split scores per recipe:\n" if compared else "")
    for recipe in compared:
        per_seed = [{"MoWE": per_arm[s, recipe.name, "both"], "base-only": per_arm[s, recipe.name, "none"]}
                    for s in seeds]
        lines += [f"### {recipe.name}\n", results_table_markdown(pool_seeds(per_seed)), ""]
    return {"markdown": "\n".join(lines) + "\n", "json": summary}


def _base_only_table(per_arm: dict, seeds: list[int], recipes: list[Recipe], splits: list[str]) -> list[str]:
    """Base-only's score per recipe, task and split: mean and spread over seeds (what the model reads of its frozen
    base, to set beside the frozen-feature probes of `probe_frozen_features.py`)."""
    lines = ["## Base-only per recipe: mean ± sd over seeds (accuracy; ASR: WER)\n",
             "Recipes with the same task mix and steps share one base-only arm, listed once.\n",
             "| recipes | split | average | " + " | ".join(STUDY_TASKS) + " |",
             "|---|---|---|" + "---|" * len(STUDY_TASKS)]
    shared: dict[tuple, list[Recipe]] = {}
    for recipe in [r for r in recipes if all((s, r.name, "none") in per_arm for s in seeds)]:
        shared.setdefault((recipe.tasks, recipe.steps), []).append(recipe)
    for group in shared.values():
        for split in splits:
            per_seed = [{"base-only": _split_result(per_arm[s, group[0].name, "none"], split)} for s in seeds]
            rows = seed_statistics(per_seed, "base-only")["base-only"]
            cells = [f"{rows[t]['mean']:.3f} ± {rows[t]['sd']:.3f}" if t in rows else ""
                     for t in ("average_score", *STUDY_TASKS)]
            lines.append(f"| {'; '.join(r.name for r in group)} | {split} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _split_result(record: dict, split: str) -> dict:
    return record if split == "test" else record[split]

if __name__ == "__main__":
    main()

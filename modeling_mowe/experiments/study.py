"""The study: MoWE arms against base-only, several seeds (docs/RESULTS.md, "Does the pool help?").

    python -m modeling_mowe.experiments study --seeds 3                 # protocol v1: the four router arms
    python -m modeling_mowe.experiments study --protocol v2 --seeds 3   # protocol v2: a homogeneous and a mixed pool
    python -m modeling_mowe.experiments study --protocol v3 --seeds 3   # v3: the mixed pool frozen, 1000 steps
    python -m modeling_mowe.experiments study --protocol v4 --seeds 3   # v4: v3, fresh parts at 3e-3, seeds 3-5
    python -m modeling_mowe.experiments study --protocol v5 --seeds 3   # v5: v4, every clip sees the whole pool

An arm is a name, a router type and a weak pool (`StudySettings.arms` and `.pools`); the first arm is the reference
every other one is compared with. v1 (`STUDY_ARMS`): base-only and the paper's router ablation, one pool, one
benchmark draw for every seed. v2 (`STUDY_V2`, `StudySettings.v2()`): base-only, MoWE with 4 x Whisper-tiny.en and
MoWE with a heterogeneous pool (tiny.en, Smart Turn v3, tiny.en specialised on emotion, on gender; `pools`), each seed
on its own benchmark draw (data seed = model seed) with a far split, every arm scored on test and far. v3
(`STUDY_V3`): base-only and the heterogeneous pool, that pool frozen (and cached), 1000 steps. v4 (`STUDY_V4`): v3
with the routers and weak projections at 3e-3, on new draws (seeds 3-5), to confirm what v3's variant found. v5
(`STUDY_V5`): v4 with each router selecting the whole pool (`router_top_k` 4), on seeds 6-8.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data import STUDY_TASKS, BenchmarkConfig, build_benchmark
from ..evaluation import bootstrap_intervals, evaluate_model, results_table_markdown
from ..training.feature_cache import FrozenFeatureStore
from .analysis import difference_verdicts, pool_seeds, routing_tables, seed_statistics
from .demo import ALIGNMENT_FIELDS, DemoSettings, align, build_model, log, prepare_parts, start_from_aligned, train
from .plots import draw_study_plots
from .pools import check_weak_encoder, parse_specialist, resolve_weak_encoders

ROUTER_TYPES = ("none", "both", "data_dependent", "data_independent")

STUDY_ARMS = (
    ("base-only", "none"),
    ("MoWE", "both"),
    ("MoWE data-dependent", "data_dependent"),
    ("MoWE data-independent", "data_independent"),
)
"""The v1 arms (name, router_type): base-only is the reference; the three MoWE arms are the paper's ablation, all
with the settings' `weak_encoders`."""

STUDY_V2 = {
    "protocol": "v2",
    "arms": (("base-only", "none"), ("MoWE homogeneous", "both"), ("MoWE heterogeneous", "both")),
    "pools": {
        "MoWE homogeneous": ("whisper-tiny.en",) * 4,
        "MoWE heterogeneous": (
            "whisper-tiny.en", "smart-turn-v3", "whisper-tiny.en@emotion", "whisper-tiny.en@gender",
        ),
    },
    "data_seed": None,  # seed s trains and tests on its own draw, BenchmarkConfig(seed=s)
    "tasks": STUDY_TASKS,
    "test_per_task": 200,
    "far_per_task": 100,  # 200 test clips per task decide; the far split checks the direction in less time
    # The fine-tuning recipe (benchmarks/recipe_ablation.py decides it; one line each to change):
    "steps": 200,
    "fresh_learning_rate": None,
    "weak_init_scale": 0.0,
}
"""Protocol v2's settings, the one place they are written (`StudySettings.v2()` applies them)."""

STUDY_V3 = {
    **STUDY_V2,
    "protocol": "v3",
    "arms": (("base-only", "none"), ("MoWE heterogeneous", "both")),
    "pools": {"MoWE heterogeneous": STUDY_V2["pools"]["MoWE heterogeneous"]},
    # What v2 found wanting (docs/RESULTS.md, "Study protocol v3"): arms far from converged, specialists unlearning.
    "steps": 1000,
    "train_weak_encoders": False,  # frozen and cached like the base: a MoWE step costs 1.2-1.5x base-only's, not 5x
}
"""Protocol v3's settings: v2's heterogeneous pool against base-only, the weak pool frozen, 1000 steps
(`StudySettings.v3()` applies them)."""

STUDY_V4 = {
    **STUDY_V3,
    "protocol": "v4",
    "fresh_learning_rate": 3e-3,  # v3's exploratory variant (docs/RESULTS.md, "Study protocol v4")
    "first_seed": 3,  # new draws: seeds 0-2 chose the variant, so they cannot confirm it
}
"""Protocol v4's settings: v3 with the fresh parts at 3e-3, on seeds (and draws) 3, 4, 5 (`StudySettings.v4()`)."""

STUDY_V5 = {
    **STUDY_V4,
    "protocol": "v5",
    "router_top_k": 4,  # every clip sees every weak encoder, weighted by the routers (docs/RESULTS.md, "... v5")
    "first_seed": 6,  # seeds 3-5 chose the dense pool, so they cannot confirm it
}
"""Protocol v5's settings: v4 with the whole pool mixed into every clip, on seeds (and draws) 6, 7, 8."""

STUDY_WINDOW_SUMMARY = {
    **STUDY_V5,
    "protocol": "window-summary",
    "arms": (("base-only", "none"), ("base-only + window summary", "none")),
    "pools": {},
    "arm_options": {"base-only + window summary": {"projector_window_summary": True}},
}
"""Does base-only read gender once every audio token carries its window's mean and spread? v5's recipe and draws
(seeds 6-8): its base-only arm against one whose projector adds a window summary (docs/RESULTS.md, "Window
summary")."""

ARM_OPTIONS = ("steps", "finetune_learning_rate", "fresh_learning_rate", "weak_init_scale", "router_top_k",
               "train_weak_encoders", "specialist_recipe", "projector_window_summary")
"""The settings an arm may set for itself in `StudySettings.arm_options`: how it is fine-tuned from the seed's
alignment. What every arm of a seed shares (the benchmark draw, the alignment's `ALIGNMENT_FIELDS`) is not."""

STUDY_FEATURE_MEMORY_BYTES = 12 * 2**30
"""The frozen features a study keeps in memory per benchmark draw: the base's and, with a frozen pool, every weak
encoder's, for train, test and far clips (about 4 GB for v3's draw); what does not fit is encoded again."""


@dataclass
class StudySettings(DemoSettings):
    """The demo's parts, and the study's protocol (docs/RESULTS.md, "Study protocol"); the defaults are v1's.

    `arms`: (name, router_type) pairs, the first one the reference. `pools`: an arm's weak pool (entries as
    `DemoSettings.weak_encoders` takes them: names, folders, `"<part>@<task>"` specialists); an arm not listed uses
    `weak_encoders`. `arm_options`: the `ARM_OPTIONS` an arm sets for itself (e.g.
    `{"projector_window_summary": True}`); the other arms keep the study's. `data_seed`: the benchmark draw of every
    seed, or None for seed s's own draw (data seed s);
    `far_per_task > 0` adds the far split, on which every arm is scored too. The seeds are `first_seed`,
    `first_seed + 1`, ... (`seeds` of them). `reference_from`: an earlier study's folder whose base-only reference
    arm, trained with the same draws and recipe (`REFERENCE_FIELDS`), is read instead of trained again."""

    seeds: int = 3
    first_seed: int = 0
    steps: int = 200
    test_per_task: int = 200
    tasks: tuple[str, ...] = STUDY_TASKS  # the demo's five and emotion
    fresh_learning_rate: float | None = 3e-3
    weak_init_scale: float = 0.1
    data_seed: int | None = 0
    far_per_task: int = 0
    arms: tuple[tuple[str, str], ...] = STUDY_ARMS
    pools: dict[str, tuple[str, ...]] = field(default_factory=dict)
    arm_options: dict[str, dict] = field(default_factory=dict)
    protocol: str = "v1"
    reference_from: Path | None = None

    def __post_init__(self):
        super().__post_init__()
        self.arms = tuple((str(name), str(router)) for name, router in self.arms)
        self.pools = {name: tuple(str(entry) for entry in pool) for name, pool in self.pools.items()}
        names = [name for name, _ in self.arms]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"arms must be (name, router_type) pairs with distinct names, got {self.arms}")
        unknown = [router for _, router in self.arms if router not in ROUTER_TYPES]
        if unknown:
            raise ValueError(f"router types must be among {ROUTER_TYPES}, got {unknown}")
        strays = [name for name in (*self.pools, *self.arm_options) if name not in names]
        if strays:
            raise ValueError(f"pools or arm_options {strays} name no arm; the arms are {names}")
        for name, options in self.arm_options.items():
            if unknown := sorted(set(options) - set(ARM_OPTIONS)):
                raise ValueError(f"arm_options[{name!r}] sets {unknown}, which an arm cannot set for itself (the draw "
                                 f"and the alignment are the seed's); choose among {list(ARM_OPTIONS)}, and put an "
                                 "arm's pool in `pools`.")
        for pool in self.pools.values():
            if not pool:
                raise ValueError("a pool needs at least one weak encoder")
            for entry in pool:
                check_weak_encoder(entry)

    @classmethod
    def v2(cls, **overrides) -> StudySettings:
        """Protocol v2's settings (`STUDY_V2`), with `overrides` on top (`output_dir`, `seeds`, a recipe field)."""
        return cls(**{**STUDY_V2, **overrides})

    @classmethod
    def v3(cls, **overrides) -> StudySettings:
        """Protocol v3's settings (`STUDY_V3`), with `overrides` on top."""
        return cls(**{**STUDY_V3, **overrides})

    @classmethod
    def v4(cls, **overrides) -> StudySettings:
        """Protocol v4's settings (`STUDY_V4`), with `overrides` on top."""
        return cls(**{**STUDY_V4, **overrides})

    @classmethod
    def v5(cls, **overrides) -> StudySettings:
        """Protocol v5's settings (`STUDY_V5`), with `overrides` on top."""
        return cls(**{**STUDY_V5, **overrides})

    @classmethod
    def window_summary(cls, **overrides) -> StudySettings:
        """The window-summary protocol's settings (`STUDY_WINDOW_SUMMARY`), with `overrides` on top."""
        return cls(**{**STUDY_WINDOW_SUMMARY, **overrides})

    def benchmark_config(self) -> BenchmarkConfig:
        """The benchmark of this seed's run: `benchmark` (with data seed `seed` when `data_seed` is None), else the
        study's tasks and sizes drawn with `data_seed`, or with `seed` when `data_seed` is None."""
        data_seed = self.seed if self.data_seed is None else self.data_seed
        if self.benchmark is not None:
            return dataclasses.replace(self.benchmark, seed=data_seed) if self.data_seed is None else self.benchmark
        return BenchmarkConfig(
            seed=data_seed, tasks=self.tasks, train_per_task=self.train_per_task, validation_per_task=0,
            test_per_task=self.test_per_task, far_per_task=self.far_per_task,
        )

    def pool(self, arm: str) -> tuple[str, ...]:
        """The weak pool of `arm`."""
        return self.pools.get(arm, self.weak_encoders)


REFERENCE_FIELDS = (*(f for f in ALIGNMENT_FIELDS if f != "seed"), "steps", "finetune_learning_rate", "tasks",
                    "test_per_task", "far_per_task", "train_per_task", "data_seed")
"""What a base-only arm's results depend on besides its benchmark draws: an earlier study whose values match can lend
its base-only arm (`StudySettings.reference_from`). The fresh parts' learning rate, the weak-column start, the pools
and `router_top_k` only change MoWE arms."""


def reference_results(settings: StudySettings) -> list[dict]:
    """Per seed of `settings`, the reference arm's results from the study in `settings.reference_from`; a clear error
    when that study cannot stand in for training the arm here (another arm type, recipe, seed or draw)."""
    folder = Path(settings.reference_from)
    try:
        earlier = json.loads((folder / "study.json").read_text())
        per_seed = json.loads((folder / "per_seed.json").read_text())
    except FileNotFoundError as error:
        message = f"reference_from={folder} holds no finished study (study.json, per_seed.json): {error}"
        raise ValueError(message) from error
    name, router_type = settings.arms[0]
    if router_type != "none":
        raise ValueError(f"Only a base-only reference arm can be reused; the first arm is {name!r} ({router_type}).")
    theirs, ours = earlier["settings"], asdict(settings)
    differing = [f for f in REFERENCE_FIELDS if json.loads(json.dumps(ours[f])) != theirs.get(f)]
    if ours["arm_options"].get(name, {}) != theirs.get("arm_options", {}).get(name, {}):
        differing.append(f"arm_options[{name!r}]")
    if differing or [name, router_type] not in theirs.get("arms", []):
        raise ValueError(f"The study in {folder} cannot stand in for this one's {name!r} arm: it differs in "
                         f"{differing or ['its arms']}. Train the arm here (leave out reference_from).")
    first = theirs.get("first_seed", 0)
    picked = []
    for seed in range(settings.first_seed, settings.first_seed + settings.seeds):
        index = seed - first
        bench = dataclasses.replace(settings, seed=seed).benchmark_config().to_dict()
        if not 0 <= index < len(per_seed) or earlier["benchmarks"][index] != json.loads(json.dumps(bench)):
            raise ValueError(f"The study in {folder} has no seed {seed} on this benchmark draw; it ran seeds "
                             f"{first}-{first + len(per_seed) - 1}.")
        picked.append(per_seed[index][name])
    return picked


def study_markdown(
    per_seed: list[dict], statistics: dict, pooled: dict, intervals: dict, reference: str, note: str = "",
    first_seed: int = 0,
) -> str:
    """The study's report on one split: per-seed tables, mean ± sd over seeds, the pooled table with intervals and
    verdicts, under a `# MoWE study` title and `note` (`split_sections` gives the sections alone)."""
    title = "# MoWE study: every arm against base-only, several seeds\n"
    sections = split_sections(per_seed, statistics, pooled, intervals, reference, first_seed=first_seed)
    return "\n".join([title, *([note] if note else []), *sections])


def arms_note(settings: StudySettings) -> str:
    """The protocol, its data and recipe, and one line per arm: its router type and weak pool (repeats counted)."""
    data = ("each seed s on its own benchmark draw (data seed s)" if settings.data_seed is None
            else f"one benchmark draw (data seed {settings.benchmark_config().seed}) for every seed")
    fresh = settings.fresh_learning_rate or settings.finetune_learning_rate
    lines = [f"Protocol {settings.protocol}: {data}; every arm fine-tuned {settings.steps} steps at "
             f"{settings.finetune_learning_rate:g} (fresh parts at {fresh:g}), the weak "
             f"columns started at {settings.weak_init_scale:g} x the aligned spread, each router selecting "
             f"{settings.router_top_k} weak encoder{'s' if settings.router_top_k > 1 else ''} per clip. Arms (router "
             "type: weak pool):\n"]
    if settings.reference_from:
        lines.append(f"The {settings.arms[0][0]} arm's results are read from {settings.reference_from} (same draws "
                     "and recipe), not trained again.\n")
    for name, router_type in settings.arms:
        pool = settings.pool(name) if router_type != "none" else ()
        counted = ", ".join(f"{pool.count(e)} x {e}" if pool.count(e) > 1 else e for e in dict.fromkeys(pool))
        options = "".join(f"; {key}={value}" for key, value in settings.arm_options.get(name, {}).items())
        lines.append(f"- {name} ({router_type}{': ' + counted if counted else ''}{options})")
    if any(parse_specialist(e) for name, router in settings.arms if router != "none" for e in settings.pool(name)):
        recipe = settings.specialist_recipe
        lines.append(f"\n`<part>@<task>`: the part specialised on the task's training clips of the seed's draw "
                     f"(`training.specialize`: {recipe['steps']} steps of {recipe['batch_size']}, encoder at "
                     f"{recipe['learning_rate']:g}, a pooled linear head).")
    return "\n".join(lines) + "\n"


def split_sections(
    per_seed: list[dict], statistics: dict, pooled: dict, intervals: dict, reference: str, level: int = 2,
    first_seed: int = 0,
) -> list[str]:
    """Markdown sections of one split's results, their headings at `level`: per-seed tables (seeds numbered from
    `first_seed`), mean ± sd over seeds (with each arm's difference to `reference` per seed), the pooled table with
    intervals and the verdicts."""
    heading = "#" * level
    parts = []
    for seed, results in enumerate(per_seed, start=first_seed):
        parts += [f"{heading} Seed {seed}\n", results_table_markdown(results)]
    parts.append(f"{heading} Mean ± sd over seeds (in brackets: the difference to {reference} per seed; ✓ = better in "
                 "every seed)\n")
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
    parts += [f"{heading} Pooled over seeds: paired bootstrap over (seed, clip), differences to {reference}\n",
              results_table_markdown(pooled, intervals=intervals),
              "```\n" + "\n".join(difference_verdicts(intervals, reference)) + "\n```\n"]
    return parts


def routing_markdown(routing: list[dict]) -> str:
    """Per MoWE arm, averaged over seeds: the fraction of each task's test windows each router sent to each weak
    encoder, then each router's mean weight on each (`routing`: per seed, `{arm: {"encoders": [...], "routers":
    routing_tables(...)["selected"], "weights": routing_tables(...)["weight"]}}`; "weights" may be absent)."""
    parts = [f"## Routing per task on the test split (mean over {len(routing)} seeds)\n",
             "Per router and task (its first 50 test clips): the fraction of windows sent to each weak encoder, a row "
             "summing to the routers' top-k; then the router's mean probability on each, a row summing to 1.\n"]
    for arm, first in routing[0].items():
        encoders = first["encoders"]
        lines = [f"### {arm}\n", "| router | task | measure | " + " | ".join(encoders) + " |",
                 "|---|---|---|" + "---:|" * len(encoders)]
        for key, measure in (("routers", "selected"), ("weights", "weight")):
            for router, per_task in first.get(key, {}).items():
                for task in per_task:
                    values = [sum(seed[arm][key][router][task][i] for seed in routing) / len(routing)
                              for i in range(len(encoders))]
                    lines.append(f"| {router} | {task} | {measure} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def summarise_split(per_seed: list[dict], reference: str, samples: int) -> dict:
    """One split's statistics over seeds, the results pooled over seeds, their paired bootstrap intervals over
    (seed, clip) and the verdicts."""
    pooled = pool_seeds(per_seed)
    intervals = bootstrap_intervals(pooled, reference=reference, samples=samples, seed=0)
    return {"statistics": seed_statistics(per_seed, reference), "pooled": pooled, "intervals": intervals,
            "verdicts": difference_verdicts(intervals, reference)}


def run_arm(
    settings: StudySettings, name: str, router_type: str, parts: dict, aligned: dict, splits, feature_store
) -> tuple[dict, list[dict]]:
    """One arm of one seed (`settings` is that seed's): its pool, fine-tuned from the seed's alignment, scored on the
    test split and the far split (when `splits` has one), and for a MoWE arm its routing per task. Returns the
    results (`train_seconds` added) and the training log history."""
    options = settings.arm_options.get(name, {})
    arm = dataclasses.replace(settings, weak_encoders=settings.pool(name), **options)
    weak = resolve_weak_encoders(arm, splits["train"]) if router_type != "none" else []
    model, processor = build_model(arm, {**parts, "weak_encoders": weak}, router_type)
    start_from_aligned(model, aligned, weak_init_scale=arm.weak_init_scale)
    model, stats = train(
        arm, name, model, processor, splits["train"], arm.steps, arm.finetune_learning_rate, feature_store,
        fresh_learning_rate=arm.fresh_learning_rate,
    )
    model.eval()
    results = evaluate_model(model, processor, splits["test"], progress=False)
    results.pop("predictions")
    if "far" in splits:
        results["far"] = evaluate_model(model, processor, splits["far"], progress=False)
        results["far"].pop("predictions")
    if router_type != "none":
        tables = routing_tables(model, processor, splits["test"])
        results["routing"] = {
            "encoders": [f"{i}:{entry}" for i, entry in enumerate(arm.weak_encoders)],
            "routers": tables["selected"], "weights": tables["weight"],
        }
    results["train_seconds"] = stats["seconds"]
    return results, stats["history"]


def run_study(settings: StudySettings) -> dict:
    """Every arm of `settings.arms` for `settings.seeds` seeds: per seed, its benchmark (one draw for every seed, or
    its own), a base-only alignment and each arm fine-tuned from it with its pool and the same steps, data order and
    recipe; evaluation on the test split (and the far split, when the benchmark has one); per MoWE arm, its routing
    per task on the test split; statistics over seeds and a paired bootstrap over clips pooled across seeds, per split.

    Writes `per_seed.json` (per seed and arm: the test results, `far` and `routing` where there are), `study.md`,
    `study.json` and the plots in `settings.output_dir`."""

    out = settings.output_dir
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    reference = settings.arms[0][0]
    arm_names = [name for name, _ in settings.arms]
    tasks = settings.benchmark_config().tasks
    untrainable = sorted({entry for name, router in settings.arms if router != "none" for entry in settings.pool(name)
                          if (spec := parse_specialist(entry)) and spec[1] not in tasks})
    if untrainable:  # before hours of alignment, not after
        raise ValueError(f"Specialists {untrainable} need their task in the benchmark; its tasks are {list(tasks)}.")
    log(f"study ({settings.protocol}): seeds {settings.first_seed}-{settings.first_seed + settings.seeds - 1} x "
        f"{len(arm_names)} arms {arm_names}, "
        f"tasks {list(tasks)}")
    feature_store, store_benchmark = None, None
    per_seed, routing, benchmarks, histories, seconds = [], [], [], {}, {}
    seeds = range(settings.first_seed, settings.first_seed + settings.seeds)
    lent = reference_results(settings) if settings.reference_from else None  # before hours of training, not after
    for seed_index, seed in enumerate(seeds):
        seed_settings = dataclasses.replace(settings, seed=seed, output_dir=out / f"seed-{seed}")
        bench_config = seed_settings.benchmark_config()
        benchmarks.append(bench_config.to_dict())
        splits = build_benchmark(out / "cache" / "benchmark", bench_config, progress=False)
        if bench_config != store_benchmark:  # the frozen base encoder's frames, shared by every arm (and seed) of it
            feature_store = FrozenFeatureStore(max_memory_bytes=STUDY_FEATURE_MEMORY_BYTES)
            store_benchmark = bench_config
        parts = prepare_parts(seed_settings, splits["train"])
        aligned, _ = align(seed_settings, parts, splits["train"], feature_store)
        results, seed_routing = {}, {}
        for name, router_type in settings.arms:
            if lent and name == reference:
                log(f"study seed {seed}: {name} from {settings.reference_from}")
                results[name] = lent[seed_index]
                continue
            log(f"study seed {seed}: {name}")
            results[name], history = run_arm(seed_settings, name, router_type, parts, aligned, splits, feature_store)
            if seed == settings.first_seed and router_type != "none":
                histories[name] = history
            if "routing" in results[name]:
                seed_routing[name] = results[name]["routing"]
        per_seed.append(results)
        routing.append(seed_routing)
        seconds[f"seed {seed}"] = round(time.perf_counter() - started, 1)
        (out / "per_seed.json").write_text(json.dumps(per_seed))

    test = summarise_split(per_seed, reference, settings.bootstrap_samples)
    markdown = study_markdown(per_seed, test["statistics"], test["pooled"], test["intervals"], reference,
                              note=arms_note(settings), first_seed=settings.first_seed)
    far = None
    if all("far" in result for results in per_seed for result in results.values()):
        far_per_seed = [{name: result["far"] for name, result in results.items()} for results in per_seed]
        far = summarise_split(far_per_seed, reference, settings.bootstrap_samples)
        markdown += "\n".join([
            "\n## Far split\n", "Voices, rates, beep bands and sentences that neither train nor test holds "
            "(`data.BenchmarkConfig.far_per_task`).\n",
            *split_sections(far_per_seed, far["statistics"], far["pooled"], far["intervals"], reference, level=3,
                            first_seed=settings.first_seed),
        ])
    if any(routing):
        markdown += "\n" + routing_markdown(routing)
    (out / "study.md").write_text(markdown)
    plots = draw_study_plots(test["pooled"], test["intervals"], histories, reference, out)
    print("\n" + markdown, flush=True)
    summary = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items() if k != "benchmark"},
        "benchmark": benchmarks[0], "benchmarks": benchmarks,
        "statistics": test["statistics"], "intervals": test["intervals"], "verdicts": test["verdicts"],
        **({"far": {k: far[k] for k in ("statistics", "intervals", "verdicts")}} if far else {}),
        "routing": {f"seed {seed}": seed_routing for seed, seed_routing in zip(seeds, routing)},
        "seconds": seconds,
        "files": [str(out / "study.md"), str(out / "per_seed.json"), *map(str, plots)],
    }
    (out / "study.json").write_text(json.dumps(summary, indent=1))
    log(f"study done in {time.perf_counter() - started:.0f} s: {out / 'study.md'}")
    return summary

"""The experiments' command line: `python -m modeling_mowe.experiments [study] ...` (or `mowe-demo`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import demo
from .demo import LLM_CHOICES, DemoSettings, run_demo
from .study import STUDY_V2, STUDY_V3, STUDY_V4, STUDY_V5, StudySettings, run_study

PROTOCOLS = {"v1": StudySettings, "v2": StudySettings.v2, "v3": StudySettings.v3, "v4": StudySettings.v4,
             "v5": StudySettings.v5, "window-summary": StudySettings.window_summary}


def study_main(argv: list[str] | None = None) -> dict:
    """`python -m modeling_mowe.experiments study --seeds 3 [--protocol v2]`: the multi-seed study
    (docs/RESULTS.md, "Study protocol"); a flag left out takes the protocol's value (`StudySettings`, `STUDY_V2`)."""
    parser = argparse.ArgumentParser(prog="python -m modeling_mowe.experiments study", description=run_study.__doc__)
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default="v1",
                        help="v1: the four router arms on one benchmark draw; v2: base-only, a homogeneous and a "
                             "heterogeneous pool, a draw per seed with a far split (study.STUDY_V2); v3: base-only "
                             "and the heterogeneous pool kept frozen, 1000 steps (study.STUDY_V3); v4: v3 with the "
                             "routers and weak projections at 3e-3, seeds 3-5 (study.STUDY_V4); v5: v4 with every "
                             "weak encoder mixed into every clip, seeds 6-8 (study.STUDY_V5); window-summary: v5's "
                             "base-only against base-only whose projector adds each window's mean and spread "
                             "(study.STUDY_WINDOW_SUMMARY)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="default: outputs/study (v1), outputs/study-<protocol> (v2, ...)")
    parser.add_argument("--seeds", type=int, default=StudySettings.seeds)
    parser.add_argument("--first-seed", type=int, default=None,
                        help=f"the seeds are first-seed, first-seed + 1, ... (v1-v3 0, "
                             f"v4 {STUDY_V4['first_seed']}, v5 {STUDY_V5['first_seed']})")
    parser.add_argument("--align-steps", type=int, default=StudySettings.align_steps)
    parser.add_argument("--router-top-k", type=int, default=None,
                        help=f"weak encoders each router selects per clip (default 1, v5 "
                             f"{STUDY_V5['router_top_k']}: the pool size mixes them all)")
    parser.add_argument("--reference-from", type=Path, default=None,
                        help="an earlier study's folder whose base-only arm (same draws and recipe) is read, not "
                             "trained again (study.REFERENCE_FIELDS)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"fine-tuning steps of each arm (v1 {StudySettings.steps}, v2 {STUDY_V2['steps']}, "
                             f"v3 {STUDY_V3['steps']})")
    parser.add_argument("--train-per-task", type=int, default=StudySettings.train_per_task)
    parser.add_argument("--test-per-task", type=int, default=None,
                        help=f"(v1 {StudySettings.test_per_task}, v2 {STUDY_V2['test_per_task']})")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: a standard deviation over seeds needs two")
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("protocol", "output_dir")}
    if args.first_seed is not None and args.first_seed < 0:
        parser.error("--first-seed must be at least 0")
    default_dir = "outputs/study" if args.protocol == "v1" else f"outputs/study-{args.protocol}"
    output_dir = args.output_dir or Path(default_dir)
    return run_study(PROTOCOLS[args.protocol](output_dir=output_dir, **given))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["study"]:
        return study_main(argv[1:])
    defaults = DemoSettings(output_dir=Path("outputs/demo"))
    parser = argparse.ArgumentParser(
        prog="python -m modeling_mowe.experiments", description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output-dir", type=Path, default=defaults.output_dir)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--llm", choices=LLM_CHOICES, default=defaults.llm,
                        help="a small Llama trained from scratch, or the converted Gemma-3-270M with LoRA")
    parser.add_argument("--align-steps", type=int, default=defaults.align_steps,
                        help="steps of the shared base-only alignment")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="fine-tuning steps of each arm")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="of the alignment")
    parser.add_argument("--finetune-learning-rate", type=float, default=defaults.finetune_learning_rate,
                        help="of both arms")
    parser.add_argument("--train-per-task", type=int, default=defaults.train_per_task)
    parser.add_argument("--test-per-task", type=int, default=defaults.test_per_task)
    args = parser.parse_args(argv)
    return run_demo(DemoSettings(**vars(args)))

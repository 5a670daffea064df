"""Mixture files: a checked schema with clear errors, weighted streamed training, per-task held-out evaluation."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import soundfile as sf
import yaml
from local_corpora import audio_dataset, tone, write_label_folders, write_librispeech

datasets = pytest.importorskip("datasets")

from modeling_mowe.data import (  # noqa: E402
    evaluation_dataset,
    load_mixture,
    parse_mixture,
    training_stream,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "examples" / "mixtures").glob("*.yaml"))


@pytest.fixture
def corpora(tmp_path, monkeypatch):
    """A project folder (the current folder) holding data/LibriSpeech and data/emotions, and the local sample
    mixture beside them."""
    monkeypatch.chdir(tmp_path)
    write_librispeech(tmp_path / "data" / "LibriSpeech", {"train-clean-100": (2, 3), "test-clean": (1, 2)})
    write_label_folders(tmp_path / "data" / "emotions", {"angry": 5, "happy": 5, "sad": 5})
    shutil.copy(ROOT / "examples" / "mixtures" / "local.yaml", tmp_path / "mixture.yaml")
    return tmp_path


def entry(**fields):
    return {"name": "libri", "layout": "librispeech", "path": "data/LibriSpeech", "kind": "transcription", **fields}


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"datasets": [entry(kind="transcripton")]},
         r"dataset 1 \('libri'\): Unknown task kind 'transcripton' \(did you mean 'transcription'\?\)"),
        ({"datasets": [entry(weight=0)]}, r"dataset 1 \('libri'\): .*weight must be a positive number, got 0"),
        ({"datasets": [entry(weight=-2.5)]}, r"weight must be a positive number, got -2.5"),
        ({"datasets": [entry(text_colum="text")]}, r"unknown key 'text_colum' \(did you mean 'text_column'\?\)"),
        ({"datasets": [entry(layout="librispeach")]}, r"unknown layout 'librispeach' \(did you mean 'librispeech'"),
        ({"datasets": [entry(weight="heavy")]}, r"dataset 1 \('libri'\): weight must be a number, got 'heavy'"),
        ({"datasets": [entry(held_out=0.1, splits={"test": "test-clean"})]}, r"either held_out or splits"),
        ({"datasets": [entry(held_out=1.5)]}, r"held_out is the share of rows held out, in \(0, 1\)"),
        ({"datasets": [entry(streaming=True)]}, r"layout 'librispeech' is read from its index"),
        ({"datasets": [entry(), entry()]}, r"dataset names must be unique; repeated: \['libri'\]"),
        ({"datasets": [entry()], "stopping_strategy": "all"}, r"stopping_strategy 'all' is not one of"),
        ({"datasets": [entry()], "sed": 1}, r"unknown key 'sed' \(did you mean 'seed'\?\)"),
        ({"datasets": []}, r"`datasets` is empty"),
        ({"datasets": [{"layout": "hub", "path": "x", "kind": "captioning"}]}, r"dataset 1: `name` is missing"),
        ({"datasets": [entry()], "bad_audio": "drop"}, r"bad_audio must be one of \('error', 'skip'\)"),
    ],
)
def test_mixture_file_errors_name_the_file_entry_and_field(tmp_path, raw, match):
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=rf"{path}.*{match}" if "dataset" in match else match):
        load_mixture(path)


def test_json_files_read_like_yaml(tmp_path):
    raw = {"seed": 3, "datasets": [entry(weight=2)]}
    (tmp_path / "mix.json").write_text(json.dumps(raw))
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(raw))
    from_json, from_yaml = load_mixture(tmp_path / "mix.json"), load_mixture(tmp_path / "mix.yaml")
    assert from_json.datasets == from_yaml.datasets and from_json.seed == 3
    assert from_json.datasets[0].weight == 2.0 and from_json.datasets[0].spec.seed == 3  # the mixture's seed


@pytest.mark.parametrize("sample", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_mixtures_parse(sample):
    mixture = load_mixture(sample)
    assert mixture.datasets and all(e.spec.kind for e in mixture.datasets)


def test_paper_mixture_lists_the_papers_tasks_from_the_hub():
    mixture = load_mixture(ROOT / "examples" / "mixtures" / "paper_tasks.yaml")
    assert {e.layout for e in mixture.datasets} == {"hub"}
    assert {e.spec.kind for e in mixture.datasets} == {"transcription", "classification", "question_answering",
                                                      "captioning"}
    assert all(e.is_streaming and e.eval_rows for e in mixture.datasets), "Hub corpora stream, evaluation is capped"
    assert "NOT RUN HERE" in (ROOT / "examples" / "mixtures" / "paper_tasks.yaml").read_text()


def test_training_streams_every_corpus_without_the_held_out_rows(corpora):
    mixture = load_mixture("mixture.yaml")
    stream = training_stream(mixture)
    assert isinstance(stream, datasets.IterableDataset)
    rows = list(stream)
    seen = {(r["source"], r["row"]) for r in rows}
    test = evaluation_dataset(mixture, "test")
    held_out = {(s, r) for s, r in zip(test["source"], test["row"])}
    assert {s for s, _ in held_out} == {"librispeech", "emotion"}
    assert len([s for s, _ in held_out if s == "emotion"]) == 3, "held_out 0.2 of 15 clips"
    assert not seen & {h for h in held_out if h[0] == "emotion"}, "a held-out row was trained on"
    assert seen == {("librispeech", i) for i in range(6)} | ({("emotion", i) for i in range(15)} - held_out)
    assert list(training_stream(mixture)) == rows, "the same seed gives the same stream"
    assert set(test["task"]) == {"asr", "emotion"} and mixture.metrics() == {"asr": "wer", "emotion": "accuracy"}
    assert set(test.filter(lambda r: r["task"] == "asr")["answer"]) == {"UTTERANCE 6 OF SPEAKER 102",
                                                                         "UTTERANCE 7 OF SPEAKER 102"}


def test_weights_set_each_corpus_share_of_the_stream(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sf.write(tmp_path / "clip.wav", tone(0.2), 16000)
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"audio": "clip.wav", "text": f"{name} {n}"}) + "\n"
                                                        for n in range(400)))
    raw = {"stopping_strategy": "first_exhausted", "shuffle_buffer": 0, "datasets": [
        {"name": name, "layout": "jsonl", "path": f"{name}.jsonl", "kind": "transcription", "weight": weight}
        for name, weight in (("a", 3), ("b", 1))]}
    first = [row["source"] for row in training_stream(parse_mixture(raw)).take(400)]
    assert 0.68 < Counter(first)["a"] / 400 < 0.82


def test_a_typo_in_a_column_fails_before_training(corpora):
    raw = yaml.safe_load(Path("mixture.yaml").read_text())
    raw["datasets"][1]["label_column"] = "emotion"
    with pytest.raises(ValueError, match=r"Dataset 'emotion': column 'emotion' \(label_column\) is missing"):
        training_stream(parse_mixture(raw, "mixture.yaml"))


def test_evaluation_needs_a_split_and_caps_rows(corpora):
    raw = yaml.safe_load(Path("mixture.yaml").read_text())
    del raw["datasets"][1]["held_out"]
    mixture = parse_mixture(raw)
    with pytest.raises(ValueError, match="label_folders layout .*there is no split 'test'.*give `held_out:`"):
        evaluation_dataset(mixture, "test")
    assert len(evaluation_dataset(parse_mixture({"datasets": raw["datasets"][:1]}), "test", limit=1)) == 1


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng builds the synthetic benchmark")
def test_the_synthetic_benchmark_is_one_mixture_among_others(tmp_path, monkeypatch):
    from modeling_mowe.data import BenchmarkConfig, build_benchmark

    monkeypatch.chdir(tmp_path)
    mixture = load_mixture(ROOT / "examples" / "mixtures" / "synthetic.yaml")
    rows = evaluation_dataset(mixture, "test")
    benchmark = build_benchmark(tmp_path / "outputs/mixture-cache/benchmark", BenchmarkConfig.tiny())["test"]
    assert list(rows["task"]) == list(benchmark["task"]) and list(rows["answer"]) == list(benchmark["answer"])
    assert list(rows["prompt"]) == list(benchmark["prompt"])
    assert mixture.metrics() == {}, "tasks from the rows: asr by WER, the rest by accuracy (the default rule)"


def test_a_mixture_sets_each_tasks_metric():
    from modeling_mowe.evaluation import score_predictions

    raw = {"datasets": [entry(), {"name": "clotho", "path": "mteb/Clotho", "kind": "captioning"},
                        {"name": "aqa", "path": "x/aqa", "kind": "question_answering", "metric": "wer"}]}
    metrics = parse_mixture(raw).metrics()
    assert metrics == {"asr": "wer", "clotho": "wer", "aqa": "wer"}
    scores = score_predictions(["clotho", "aqa"], ["a dog barks", "two"], ["a dog barks loudly", "two"],
                               metrics=metrics)
    assert scores["tasks"]["clotho"]["metric"] == "wer" and scores["tasks"]["clotho"]["value"] == pytest.approx(0.25)
    assert score_predictions(["clotho"], ["a dog"], ["a dog barks"])["tasks"]["clotho"]["metric"] == "accuracy"


def test_a_true_stream_holds_rows_out_by_clip_name(tmp_path, monkeypatch):
    # `datasets` pauses 5 s when a parquet stream's reader threads end (an Arrow workaround); not needed here.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    audio_dataset([f"row {n}" for n in range(30)]).to_parquet(str(tmp_path / "clips.parquet"))
    raw = {"datasets": [{"name": "pq", "layout": "parquet", "path": str(tmp_path / "clips.parquet"),
                         "streaming": True, "kind": "transcription", "held_out": 0.3, "eval_rows": 30}]}
    mixture = parse_mixture(raw)
    train = {row["answer"] for row in training_stream(mixture)}
    test = set(evaluation_dataset(mixture, "test")["answer"])
    assert train.isdisjoint(test) and train | test == {f"row {n}" for n in range(30)}
    assert 3 <= len(test) <= 16, "about 30 % of 30 rows"


def test_string_labels_are_listed_alike_in_train_and_held_out_prompts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sf.write(tmp_path / "clip.wav", tone(0.2), 16000)
    # The held-out rows (4, 9 and 11 for this seed and name) hold no "maybe": their prompts list it all the same.
    labels = ["maybe", "yes", "no", "maybe", "no", "yes", "no", "maybe", "yes", "yes", "no", "no"]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"audio": "clip.wav", "label": label}) + "\n"
                                              for label in labels))
    raw = {"datasets": [{"name": "q", "layout": "jsonl", "path": "q.jsonl", "kind": "classification",
                         "held_out": 0.25, "instructions": ["One of: {labels}."]}]}
    mixture = parse_mixture(raw)
    test = evaluation_dataset(mixture, "test")
    assert set(test["answer"]) == {"no", "yes"}
    prompts = {row["prompt"] for row in training_stream(mixture)} | set(test["prompt"])
    assert prompts == {"One of: maybe, no, yes."}

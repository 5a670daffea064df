"""Local layouts a user already has, each read from a small copy made here, and adapted to its task."""

from __future__ import annotations

import os

import pytest
from local_corpora import audio_dataset, write_aqa_jsonl, write_audiofolder, write_label_folders, write_librispeech

datasets = pytest.importorskip("datasets")

from modeling_mowe.data import TaskSpec, adapt_dataset, load_layout  # noqa: E402


def readable(rows) -> bool:
    """Every adapted row's clip is an existing file or holds bytes."""
    return all(r["audio"]["bytes"] or os.path.isfile(r["audio"]["path"]) for r in rows)


def test_audiofolder_with_metadata_csv(tmp_path):
    write_audiofolder(tmp_path, {"train": ["hello there", "good morning"], "test": ["good night"]})
    train = load_layout("audiofolder", tmp_path, "train")
    assert train.column_names == ["audio", "transcription"]
    assert train[1]["audio"] == str(tmp_path / "train" / "clips" / "1.wav")
    rows = adapt_dataset(load_layout("audiofolder", tmp_path, "test"),
                         TaskSpec(kind="transcription", text_column="transcription"), "folder")
    assert list(rows["answer"]) == ["good night"] and readable(rows)
    streamed = load_layout("audiofolder", tmp_path, "train", streaming=True)
    assert [r["audio"] for r in streamed] == list(train["audio"])


@pytest.mark.parametrize("builder", ["parquet", "arrow"])
def test_parquet_and_arrow_files_with_an_audio_feature(tmp_path, builder):
    data = audio_dataset(["one", "two", "three"])
    if builder == "parquet":
        path = tmp_path / "train-00000.parquet"
        data.to_parquet(str(path))
    else:
        data.save_to_disk(str(tmp_path / "saved"))
        path = next((tmp_path / "saved").glob("*.arrow"))
    for streaming in (False, True):
        split = load_layout(builder, path, "train", streaming=streaming)
        assert split.features["audio"] == datasets.Audio(decode=False)
        rows = list(adapt_dataset(split, TaskSpec(kind="transcription"), builder))
        assert [r["answer"] for r in rows] == ["one", "two", "three"]
        original = data.cast_column("audio", datasets.Audio(decode=False))[0]["audio"]
        assert rows[0]["audio"]["bytes"] == original["bytes"]
    with pytest.raises(ValueError, match="one file is one split"):
        load_layout(builder, path, "test")


def test_a_parquet_folder_gives_splits_by_file_name(tmp_path):
    audio_dataset(["a", "b"]).to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    audio_dataset(["c"]).to_parquet(str(tmp_path / "test-00000-of-00001.parquet"))
    assert list(load_layout("parquet", tmp_path, "test")["text"]) == ["c"]
    with pytest.raises(ValueError, match="no split 'tset' \\(did you mean 'test'\\?\\)"):
        load_layout("parquet", tmp_path, "tset")


def test_save_to_disk_folder(tmp_path):
    datasets.DatasetDict({"train": audio_dataset(["a"]), "test": audio_dataset(["b"])}).save_to_disk(str(tmp_path))
    assert list(load_layout("disk", tmp_path, "test")["text"]) == ["b"]
    assert [r["text"] for r in load_layout("disk", tmp_path, "train", streaming=True)] == ["a"]


def test_librispeech_tree(tmp_path):
    texts = write_librispeech(tmp_path / "LibriSpeech", {"train-clean-100": (2, 3), "test-clean": (1, 2)})
    train = load_layout("librispeech", tmp_path / "LibriSpeech", "train-clean-100")
    assert train.column_names == ["audio", "text", "speaker_id", "chapter_id", "id"]
    assert list(train["text"]) == texts["train-clean-100"]
    assert train[0]["audio"].endswith(f"{train[0]['speaker_id']}/7/{train[0]['id']}.flac")
    rows = adapt_dataset(train, TaskSpec(kind="transcription"), "libri")
    assert len(rows) == 6 and readable(rows) and set(rows["task"]) == {"asr"}
    # One tree is split `train` by itself.
    assert len(load_layout("librispeech", tmp_path / "LibriSpeech" / "test-clean", "train")) == 2
    with pytest.raises(ValueError, match="no split 'test'.*splits found: \\['test-clean', 'train-clean-100'\\]"):
        load_layout("librispeech", tmp_path / "LibriSpeech", "test")


def test_folder_per_label_tree(tmp_path):
    write_label_folders(tmp_path / "flat", {"angry": 2, "happy": 3, "sad": 1})
    data = load_layout("label_folders", tmp_path / "flat", "train")
    assert data.features["label"].names == ["angry", "happy", "sad"]
    rows = adapt_dataset(data, TaskSpec(kind="classification", task="emotion"), "emo")
    assert list(rows["answer"]) == ["angry"] * 2 + ["happy"] * 3 + ["sad"] and readable(rows)
    # Split folders: every split gets the names of all of them.
    write_label_folders(tmp_path / "split", {"angry": 2, "happy": 2}, split="train")
    write_label_folders(tmp_path / "split", {"angry": 1}, split="test")
    test = load_layout("label_folders", tmp_path / "split", "test")
    assert test.features["label"].names == ["angry", "happy"] and len(test) == 1


def test_aqa_json_lines_with_relative_paths(tmp_path):
    write_aqa_jsonl(tmp_path / "aqa" / "train.jsonl", [("Is a dog barking?", "yes"), ("How many birds?", "three")])
    data = load_layout("jsonl", tmp_path / "aqa" / "train.jsonl", "train")
    assert data[0]["audio"] == str(tmp_path / "aqa" / "clips" / "0.wav")
    rows = adapt_dataset(data, TaskSpec(kind="question_answering", task="aqa"), "clotho-aqa")
    assert list(rows["answer"]) == ["yes", "three"] and "How many birds?" in rows[1]["prompt"] and readable(rows)
    folder_of_splits = load_layout("jsonl", tmp_path / "aqa", "train")  # a folder of <split>.jsonl
    assert list(folder_of_splits["answer"]) == ["yes", "three"]


def test_missing_paths_and_unknown_layouts_are_named(tmp_path):
    with pytest.raises(ValueError, match="Unknown layout 'librispeach' \\(did you mean 'librispeech'\\?\\)"):
        load_layout("librispeach", tmp_path, "train")
    with pytest.raises(ValueError, match="'.*nowhere' does not exist"):
        load_layout("label_folders", tmp_path / "nowhere", "train")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "metadata.csv").write_text("path,transcription\na.wav,hi\n")
    with pytest.raises(ValueError, match="no `file_name` column"):
        load_layout("audiofolder", tmp_path / "meta", "train")

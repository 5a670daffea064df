"""Task adapters: any corpus with audio becomes rows the collator and the evaluation read; bad rows are named."""

from __future__ import annotations

import logging

import pytest
import soundfile as sf
from local_corpora import tone, wav_bytes

datasets = pytest.importorskip("datasets")

from modeling_mowe.data import INSTRUCTIONS, BadRowError, TaskSpec, adapt_dataset  # noqa: E402


@pytest.fixture
def clips(tmp_path):
    """Paths of six short WAV clips."""
    paths = []
    for n in range(6):
        path = tmp_path / f"clip{n}.wav"
        sf.write(path, tone(0.3, n), 16000, subtype="PCM_16")
        paths.append(str(path))
    return paths


def transcripts(clips, **columns):
    return datasets.Dataset.from_dict({"audio": clips, "text": [f"words number {n}" for n in range(len(clips))],
                                       **columns})


def test_transcription_rows_are_chat_rows_with_the_clip_and_the_transcript(clips):
    rows = adapt_dataset(transcripts(clips), TaskSpec(kind="transcription"), "mine")
    assert rows.column_names == ["audio", "messages", "task", "answer", "prompt", "instruction", "source", "row"]
    row = rows[2]
    assert row["audio"] == {"bytes": None, "path": clips[2]}
    user, assistant = row["messages"]
    assert user["role"] == "user" and user["content"][0]["type"] == "audio"
    assert user["content"][1] == {"type": "text", "text": row["prompt"]}
    assert assistant["content"][0]["text"] == "words number 2" == row["answer"]
    assert row["task"] == "asr" and row["source"] == "mine" and row["row"] == 2
    assert row["prompt"] == INSTRUCTIONS["transcription"][row["instruction"]]


def test_phrasings_vary_per_row_and_repeat_for_a_seed(tmp_path):
    path = tmp_path / "one.wav"
    sf.write(path, tone(0.2), 16000)
    data = transcripts([str(path)] * 40)
    first = adapt_dataset(data, TaskSpec(kind="transcription", seed=0), "mine")["instruction"]
    again = adapt_dataset(data, TaskSpec(kind="transcription", seed=0), "mine")["instruction"]
    other = adapt_dataset(data, TaskSpec(kind="transcription", seed=1), "mine")["instruction"]
    assert list(first) == list(again)
    assert list(first) != list(other)
    assert set(first) == set(range(len(INSTRUCTIONS["transcription"])))


def test_class_label_names_are_the_answers_renamed_and_listed_in_the_prompt(clips):
    data = datasets.Dataset.from_dict(
        {"audio": clips, "emotion": [0, 1, 2, 0, 1, 2]},
        features=datasets.Features({"audio": datasets.Value("string"),
                                    "emotion": datasets.ClassLabel(names=["ang", "hap", "sad"])}),
    )
    spec = TaskSpec(kind="classification", label_column="emotion", label_renames={"ang": "angry", "hap": "happy"},
                    instructions=["Which emotion? One of: {labels}."])
    rows = adapt_dataset(data, spec, "emo")
    assert list(rows["answer"]) == ["angry", "happy", "sad", "angry", "happy", "sad"]
    assert set(rows["prompt"]) == {"Which emotion? One of: angry, happy, sad."}
    assert set(rows["task"]) == {"emo"}


def test_question_answering_and_captioning(clips):
    qa = datasets.Dataset.from_dict({"audio": clips[:2], "q": ["How many dogs bark?", "Is it raining?"],
                                     "a": ["two", "yes"]})
    rows = adapt_dataset(qa, TaskSpec(kind="question_answering", question_column="q", answer_column="a"), "aqa")
    assert [r["answer"] for r in rows] == ["two", "yes"]
    assert all(q in p for q, p in zip(["How many dogs bark?", "Is it raining?"], rows["prompt"]))
    captions = datasets.Dataset.from_dict({"audio": clips[:2], "text": [["a dog barks", "barking"], ["rain"]]})
    rows = adapt_dataset(captions, TaskSpec(kind="captioning", task="caption"), "clotho")
    assert rows[0]["answer"] in ("a dog barks", "barking") and rows[1]["answer"] == "rain"
    assert rows[0]["prompt"] in INSTRUCTIONS["captioning"]


def test_an_audio_feature_with_bytes_stays_undecoded(clips):
    data = datasets.Dataset.from_dict({"audio": [{"bytes": wav_bytes(0.3), "path": "a.wav"}], "text": ["hi"]})
    data = data.cast_column("audio", datasets.Audio(sampling_rate=16000))
    row = adapt_dataset(data, TaskSpec(kind="transcription"), "bytes")[0]
    assert row["audio"]["bytes"] == wav_bytes(0.3)


def test_a_stream_is_adapted_lazily_as_it_is_read(clips):
    reads = []

    def rows():
        for n, clip in enumerate(clips * 50):
            reads.append(n)
            yield {"audio": clip, "text": f"row {n}"}

    features = datasets.Features({"audio": datasets.Value("string"), "text": datasets.Value("string")})
    stream = adapt_dataset(datasets.IterableDataset.from_generator(rows, features=features),
                           TaskSpec(kind="transcription"), "stream", batch_size=8)
    assert isinstance(stream, datasets.IterableDataset) and reads == []
    first = next(iter(stream))
    assert first["answer"] == "row 0" and first["row"] == 0
    assert len(reads) < 50, "reading one row must not read the corpus"


def test_a_stream_without_declared_features_is_checked_on_its_first_row(clips):
    def rows():
        for n, clip in enumerate(clips):
            yield {"audio": clip, "sentence": f"row {n}"}

    stream = datasets.IterableDataset.from_generator(rows)
    assert stream.column_names is None
    with pytest.raises(ValueError, match=r"column 'text' \(text_column\) is missing.*\['audio', 'sentence'\]"):
        adapt_dataset(stream, TaskSpec(kind="transcription"), "stream")
    adapted = adapt_dataset(stream, TaskSpec(kind="transcription", text_column="sentence"), "stream")
    assert [r["answer"] for r in adapted] == [f"row {n}" for n in range(len(clips))]


def test_adapted_rows_are_what_the_collator_trains_on(clips, processor):
    from modeling_mowe.training import IGNORE_INDEX, MoWEDataCollator

    rows = adapt_dataset(transcripts(clips[:2]), TaskSpec(kind="transcription"), "mine")
    batch = MoWEDataCollator(processor)(list(rows))
    assert batch["audio_lengths"].tolist() == [int(0.3 * 16000)] * 2
    trained = processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX])
    assert "words number 0" in trained


# Bad input: each case raises a ValueError naming the corpus, the row and the column.


def test_unknown_task_kind_suggests_the_right_one():
    with pytest.raises(ValueError, match="Unknown task kind 'clasification'.*did you mean 'classification'"):
        TaskSpec(kind="clasification")


def test_a_missing_column_is_named_with_the_columns_there(clips):
    with pytest.raises(ValueError, match=r"Dataset 'mine': column 'transcript' \(text_column\) is missing.*'text'"):
        adapt_dataset(transcripts(clips), TaskSpec(kind="transcription", text_column="transcript"), "mine")


@pytest.mark.parametrize(
    "labels, column, spec_labels, match",
    [
        ([0, 1, -1], datasets.ClassLabel(names=["angry", "sad"]), None,
         r"row 2, column 'label': holds -1, outside the ClassLabel names \['angry', 'sad'\]"),
        (["angry", "sad", "sadd"], datasets.Value("string"), ["angry", "sad"],
         r"row 2, column 'label': holds 'sadd' \(did you mean 'sad'\?\), which is not one of the labels"),
    ],
)
def test_a_label_outside_the_names_is_named(clips, labels, column, spec_labels, match):
    data = datasets.Dataset.from_dict(
        {"audio": clips[:3], "label": labels},
        features=datasets.Features({"audio": datasets.Value("string"), "label": column}),
    )
    with pytest.raises(BadRowError, match="Dataset 'emo', " + match):
        adapt_dataset(data, TaskSpec(kind="classification", labels=spec_labels), "emo")


def bad_clips(tmp_path):
    """(name, path) of clips that cannot train: unreadable, empty, too long (31 s), absent."""
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio at all" * 10)
    empty = tmp_path / "empty.wav"
    sf.write(empty, tone(0.0), 16000, subtype="PCM_16")
    long = tmp_path / "long.flac"
    sf.write(long, tone(31.0), 16000)
    return [("unreadable", str(garbage), "cannot be read as audio"), ("empty", str(empty), r"is empty \(0 samples\)"),
            ("too long", str(long), r"is 31.0 s long, over the 30 s limit"),
            ("missing", str(tmp_path / "gone.wav"), "names the file .*gone.wav., which does not exist")]


def test_bad_clips_raise_naming_dataset_row_and_column(clips, tmp_path):
    for kind, path, match in bad_clips(tmp_path):
        data = transcripts([clips[0], path, clips[1]])
        with pytest.raises(BadRowError, match=rf"Dataset 'mine', row 1, column 'audio': the clip {match}") as err:
            adapt_dataset(data, TaskSpec(kind="transcription"), "mine")
        assert "bad_audio: skip" in str(err.value), kind


def test_skipped_clips_are_dropped_counted_and_logged(clips, tmp_path, caplog):
    bad = bad_clips(tmp_path)
    data = transcripts([clips[0]] + [path for _, path, _ in bad] + [clips[1]], audio_id=list(range(6)))
    with caplog.at_level(logging.WARNING, logger="modeling_mowe.data.adapters"):
        rows = adapt_dataset(data, TaskSpec(kind="transcription", bad_audio="skip"), "mine")
    assert list(rows["row"]) == [0, 5]
    assert all(row["audio"]["path"] in clips for row in rows)
    assert rows.mowe_adapter.skipped == {"unreadable": 1, "empty": 1, "too long": 1, "missing": 1}
    skips = [r.getMessage() for r in caplog.records if "skipped (bad_audio: skip" in r.getMessage()]
    assert len(skips) == 4 and "Dataset 'mine', row 1, column 'audio'" in skips[0]
    assert any("skipped 4 row(s)" in r.getMessage() for r in caplog.records)


def test_a_row_without_audio_is_never_kept(clips):
    data = transcripts([clips[0], None])
    with pytest.raises(BadRowError, match="row 1, column 'audio': the clip has no audio"):
        adapt_dataset(data, TaskSpec(kind="transcription"), "mine")
    assert len(adapt_dataset(data, TaskSpec(kind="transcription", bad_audio="skip"), "mine")) == 1


def test_empty_answers_are_named(clips):
    with pytest.raises(BadRowError, match="Dataset 'mine', row 0, column 'text': has no transcript"):
        adapt_dataset(transcripts(clips[:1]).map(lambda r: {"text": "  "}), TaskSpec(kind="transcription"), "mine")


def test_spec_checks_its_own_fields():
    with pytest.raises(ValueError, match="may use \\['question'\\]"):
        TaskSpec(kind="question_answering", instructions=["{question} {labels}"])
    with pytest.raises(ValueError, match="must hold {question}"):
        TaskSpec(kind="question_answering", instructions=["Answer it."])
    with pytest.raises(ValueError, match="bad_audio must be one of"):
        TaskSpec(kind="captioning", bad_audio="ignore")
    with pytest.raises(ValueError, match="max_audio_seconds must be positive"):
        TaskSpec(kind="captioning", max_audio_seconds=0)


def test_string_labels_of_a_stream_need_their_names(clips):
    stream = datasets.Dataset.from_dict({"audio": clips[:2], "label": ["a", "b"]}).to_iterable_dataset()
    with pytest.raises(ValueError, match="give `labels:`"):
        adapt_dataset(stream, TaskSpec(kind="classification"), "emo")
    rows = list(adapt_dataset(stream, TaskSpec(kind="classification", labels=["a", "b"]), "emo"))
    assert [r["answer"] for r in rows] == ["a", "b"]


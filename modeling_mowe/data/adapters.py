"""Task adapters: any `datasets` corpus with audio becomes MoWE training / evaluation rows, without conversion code.

A :class:`TaskSpec` says what a corpus holds (a task kind and the names of its columns); :func:`adapt_dataset` maps
every row, lazily for an :class:`~datasets.IterableDataset`, to the rows `MoWEDataCollator` and `evaluate_model` read:

===============  ================================================================================================
column           value
===============  ================================================================================================
``audio``        the clip, undecoded (``Audio(decode=False)``: ``{"bytes", "path"}``); the collator decodes it
``messages``     user: ``[{"type": "audio"}, {"type": "text", "text": <prompt>}]``; assistant: the answer
``task``         the task name (scores are reported per task)
``answer``       the reference answer: transcript, label name, answer or caption
``prompt``       the instruction the user turn holds
``instruction``  which of the spec's phrasings it is (0-based), drawn per row from the seed (reproducible)
``source``       the corpus name
``row``          the row's index in its source split (what error messages cite)
===============  ================================================================================================

Task kinds (:data:`TASK_KINDS`) and the columns each reads:

- ``transcription``: ``text_column`` is the transcript (ASR);
- ``classification``: ``label_column`` holds a label; `ClassLabel` integers are resolved to their names, string labels
  are checked against ``labels`` when given, and ``label_renames`` maps names to the answers the model learns;
- ``question_answering``: ``question_column`` is put into the instruction, ``answer_column`` is the answer;
- ``captioning``: ``text_column`` is the caption (a list of captions: one is drawn per row, from the seed).

Bad rows raise a :class:`ValueError` that names the corpus, the row and the column. Clips that are missing, unreadable,
empty or longer than ``max_audio_seconds`` do so too, or, with ``bad_audio="skip"``, are dropped, each one logged
(``WARNING`` on the ``modeling_mowe.data.adapters`` logger, with a running count) and counted in
:attr:`TaskAdapter.skipped`: a row is never kept without its audio. Clips are checked from their file header
(`soundfile.info`), not decoded, so adapting costs a small fraction of a training step.

Tooling wing: imports the model code's audio helpers, never the other way round.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import logging
import os
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import soundfile as sf

from ..feature_extraction_mowe import _check_wav_complete
from .benchmark import chat_messages, to_wav_bytes

if TYPE_CHECKING:
    from datasets import Dataset, Features, IterableDataset

logger = logging.getLogger(__name__)

TASK_KINDS = ("transcription", "classification", "question_answering", "captioning")

BAD_AUDIO_POLICIES = ("error", "skip")

DEFAULT_MAX_AUDIO_SECONDS = 30.0
"""The default clip limit: one Whisper window. Longer clips would be encoded in several windows, which training on
a corpus of short utterances seldom wants; raise it per mixture (``max_audio_seconds``) where it does."""

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "transcription": (
        "Transcribe the audio.",
        "Write down what the speaker says.",
        "What is said in this recording? Give the exact words.",
        "Please transcribe this speech.",
    ),
    "classification": (
        "Classify the audio. Answer with one of: {labels}.",
        "Which of these fits the audio best: {labels}?",
        "Listen and choose one label from: {labels}.",
    ),
    "question_answering": (
        "{question}",
        "Listen to the audio and answer: {question}",
        "Answer the question about the audio. {question}",
    ),
    "captioning": (
        "Describe the audio.",
        "Write a caption for this recording.",
        "What can you hear in this audio? Describe it in one sentence.",
    ),
}
"""Default phrasings per task kind. A row's phrasing is drawn from its corpus name, row index and the seed, so a
model does not learn one prompt, and the same row gets the same phrasing in every run and every worker."""

DEFAULT_METRICS = {
    "transcription": "wer",
    "classification": "accuracy",
    "question_answering": "accuracy",
    "captioning": "wer",
}
"""How `evaluate_model` scores each kind: WER for free text (for captions, a word-overlap proxy: CIDEr/SPICE need
packages this project does not ship), exact-match accuracy after normalisation for labels and short answers."""

PLACEHOLDERS = {"classification": {"labels"}, "question_answering": {"question"}}

SOURCE_ROW_COLUMN = "row"
ROW_INDEX_COLUMN = "__mowe_row__"
"""A column a mixture adds before it filters a corpus (held-out splits), so that adapted rows and error messages
keep citing the row's index in its source split."""


def adapted_features() -> Features:
    """The :class:`datasets.Features` of every adapted corpus (identical, so mixtures interleave and concatenate)."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features(
        {
            "audio": datasets.Audio(decode=False),
            "messages": datasets.List(
                {"role": text, "content": datasets.List({"type": text, "text": datasets.Value("string")})}
            ),
            "task": text,
            "answer": text,
            "prompt": text,
            "instruction": datasets.Value("int32"),
            "source": text,
            SOURCE_ROW_COLUMN: datasets.Value("int64"),
        }
    )


ADAPTED_COLUMNS = ("audio", "messages", "task", "answer", "prompt", "instruction", "source", SOURCE_ROW_COLUMN)


def suggest(value: str, choices: Sequence[str]) -> str:
    """`" (did you mean 'x'?)"` for the closest of `choices`, or `""`."""
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class TaskSpec:
    """What one corpus holds: its task kind, its columns, and how its rows become instructions and answers.

    Args:
        kind: one of :data:`TASK_KINDS`.
        task: the name in the ``task`` column (per-task scores); default ``"asr"`` for transcription, else the
            corpus name.
        audio_column: the clips (an ``Audio`` column, file paths, or ``{"bytes", "path"}`` cells).
        text_column: the transcript (transcription) or caption(s) (captioning).
        label_column: the label (classification): a ``ClassLabel`` integer or a string.
        question_column, answer_column: question and answer (question answering).
        task_column: take each row's task name from this column instead (a corpus of several tasks).
        labels: the allowed labels of a string label column (a row outside them is an error), or the names of an
            integer column that is not a ``ClassLabel``; they fill ``{labels}`` in classification instructions.
        label_renames: label name -> the answer the model learns (``{"ang": "angry"}``); keys must be labels.
        instructions: phrasings to draw from (default :data:`INSTRUCTIONS` of the kind); ``{labels}``
            (classification) and ``{question}`` (question answering) are filled per row.
        max_audio_seconds: longer clips are bad audio (None: no limit).
        bad_audio: ``"error"`` (default) raises on a missing, unreadable, empty or too long clip; ``"skip"`` drops
            the row, logs it and counts it.
        seed: draws each row's phrasing (with the corpus name and row index).
        metric: ``"wer"`` or ``"accuracy"``; default :data:`DEFAULT_METRICS` of the kind.
    """

    kind: str
    task: str | None = None
    audio_column: str = "audio"
    text_column: str = "text"
    label_column: str = "label"
    question_column: str = "question"
    answer_column: str = "answer"
    task_column: str | None = None
    labels: list[str] | None = None
    label_renames: dict[str, str] = field(default_factory=dict)
    instructions: list[str] | None = None
    max_audio_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS
    bad_audio: str = "error"
    seed: int = 0
    metric: str | None = None

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(
                f"Unknown task kind {self.kind!r}{suggest(str(self.kind), TASK_KINDS)}; the kinds are "
                f"{', '.join(TASK_KINDS)}."
            )
        if self.bad_audio not in BAD_AUDIO_POLICIES:
            raise ValueError(
                f"bad_audio must be one of {BAD_AUDIO_POLICIES}, got {self.bad_audio!r}"
                f"{suggest(str(self.bad_audio), BAD_AUDIO_POLICIES)}."
            )
        if self.max_audio_seconds is not None and not self.max_audio_seconds > 0:
            raise ValueError(
                f"max_audio_seconds must be positive (or None for no limit), got {self.max_audio_seconds}."
            )
        if self.metric is not None and self.metric not in ("wer", "accuracy"):
            raise ValueError(f"metric must be 'wer' or 'accuracy', got {self.metric!r}.")
        if self.instructions is not None:
            if not self.instructions or not all(isinstance(i, str) and i.strip() for i in self.instructions):
                raise ValueError("instructions must be a non-empty list of non-empty strings.")
            allowed = PLACEHOLDERS.get(self.kind, set())
            for instruction in self.instructions:
                used = {name for _, name, _, _ in string.Formatter().parse(instruction) if name is not None}
                if used - allowed:
                    raise ValueError(
                        f"Instruction {instruction!r} uses {sorted(used - allowed)}; a {self.kind} instruction may "
                        f"use {sorted(allowed) or 'no placeholders'} (write literal braces as {{{{ and }}}})."
                    )
                if self.kind == "question_answering" and "question" not in used:
                    raise ValueError(f"A question_answering instruction must hold {{question}}: {instruction!r}.")
        if self.labels is not None and (not self.labels or len(set(map(str, self.labels))) != len(self.labels)):
            raise ValueError(f"labels must be a non-empty list without repeats, got {self.labels!r}.")

    @property
    def phrasings(self) -> tuple[str, ...]:
        return tuple(self.instructions) if self.instructions else INSTRUCTIONS[self.kind]

    @property
    def metric_name(self) -> str:
        return self.metric or DEFAULT_METRICS[self.kind]

    def task_name(self, source: str) -> str:
        """The ``task`` of this corpus's rows (without ``task_column``)."""
        return self.task or ("asr" if self.kind == "transcription" else source)

    def required_columns(self) -> dict[str, str]:
        """Spec field -> the column it names, for the columns this kind reads."""
        columns = {"audio_column": self.audio_column}
        columns.update({
            "transcription": {"text_column": self.text_column},
            "captioning": {"text_column": self.text_column},
            "classification": {"label_column": self.label_column},
            "question_answering": {"question_column": self.question_column, "answer_column": self.answer_column},
        }[self.kind])
        if self.task_column:
            columns["task_column"] = self.task_column
        return columns


def row_draw(seed: int, source: str, row: int, n: int) -> int:
    """A reproducible choice in ``range(n)`` for one row: the same in every run, process and worker."""
    digest = hashlib.blake2b(f"{seed}\0{source}\0{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def row_fraction(seed: int, source: str, row: int | str) -> float:
    """A reproducible number in [0, 1) per row (its index, or a key such as a file name): held-out splits draw on
    it."""
    digest = hashlib.blake2b(f"held-out\0{seed}\0{source}\0{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class BadRowError(ValueError):
    """A row a corpus cannot give: names the corpus, the row and the column."""


def audio_cell(value: Any) -> dict[str, Any] | None:
    """An audio value in any form a corpus stores it -> an undecoded cell ``{"bytes", "path"}``, or None if absent.

    Accepts file paths, ``{"bytes", "path"}`` (``Audio(decode=False)``) and decoded ``{"array", "sampling_rate"}``
    cells (written as 16-bit WAV bytes)."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return {"bytes": None, "path": os.fspath(value)}
    if isinstance(value, Mapping):
        if value.get("array") is not None and value.get("sampling_rate") is not None:
            import numpy as np

            return {"bytes": to_wav_bytes(np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])),
                    "path": value.get("path")}
        if value.get("bytes") is not None or value.get("path") is not None:
            return {"bytes": value.get("bytes"), "path": value.get("path")}
        return None
    raise TypeError(f"expected a file path or an audio cell ({{'bytes', 'path'}}), got {type(value).__name__}")


def clip_problem(cell: dict[str, Any] | None, max_seconds: float | None) -> tuple[str, str] | None:
    """What is wrong with a clip, from its header (no decoding): ``(kind, description)`` with kind one of
    ``"missing"``, ``"unreadable"``, ``"empty"``, ``"too long"``; or None if the clip is usable."""
    if cell is None:
        return "missing", "has no audio"
    source = cell["bytes"] if cell.get("bytes") is not None else cell["path"]
    if isinstance(source, str) and not os.path.isfile(source):
        return "missing", f"names the file {source!r}, which does not exist"
    try:
        _check_wav_complete(source)
        info = sf.info(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except Exception as err:  # soundfile raises several types for unreadable input
        where = "its bytes" if isinstance(source, (bytes, bytearray)) else f"the file {source!r}"
        return "unreadable", f"cannot be read as audio ({where}: {str(err).strip() or type(err).__name__})"
    if info.frames <= 0 or info.samplerate <= 0:
        return "empty", "is empty (0 samples)"
    seconds = info.frames / info.samplerate
    if max_seconds is not None and seconds > max_seconds:
        return "too long", f"is {seconds:.1f} s long, over the {max_seconds:g} s limit (max_audio_seconds)"
    return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


@dataclass
class TaskAdapter:
    """Turns one corpus's rows into adapted rows (see the module docstring); used by :func:`adapt_dataset`.

    `skipped` counts the rows dropped for bad audio (``bad_audio="skip"``), by problem, in the process that adapted
    them (each DataLoader worker counts its own rows; every skip is also logged).
    """

    spec: TaskSpec
    source: str
    label_names: list[str] | None = None
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self):
        spec = self.spec
        if spec.kind == "classification":
            if self.label_names is None and any("{labels}" in p for p in spec.phrasings):
                raise ValueError(
                    f"Dataset {self.source!r}: the labels of column {spec.label_column!r} are not known (it is not a "
                    "ClassLabel and the corpus streams), and the instructions name them ({labels}): give `labels:` "
                    "in its mixture entry."
                )
            unknown = sorted(set(spec.label_renames) - set(self.label_names or spec.label_renames))
            if unknown:
                raise ValueError(
                    f"Dataset {self.source!r}: label_renames names {unknown}, which are not labels of column "
                    f"{spec.label_column!r} (its labels: {self.label_names})."
                )
            self.label_names = list(self.label_names) if self.label_names is not None else None
            answers = [spec.label_renames.get(name, name) for name in self.label_names or []]
            self._labels_text = ", ".join(dict.fromkeys(answers))

    def fail(self, row: int, column: str, problem: str, fix: str) -> BadRowError:
        return BadRowError(f"Dataset {self.source!r}, row {row}, column {column!r}: {problem}. {fix}")

    def _label(self, value: Any, row: int) -> str:
        spec, names = self.spec, self.label_names
        column = spec.label_column
        if value is None:
            raise self.fail(row, column, "has no label", "Fill it in or remove the row.")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.fail(row, column, f"holds {value!r}, not a label", "Give a label name or a ClassLabel index.")
        if isinstance(value, int):
            if names is None:
                raise self.fail(row, column, f"holds the integer {value} and the column has no label names",
                                "Cast it to a ClassLabel or give `labels:` (the names in index order).")
            if not 0 <= value < len(names):
                raise self.fail(row, column, f"holds {value}, outside the ClassLabel names {names} "
                                f"(0..{len(names) - 1}; -1 marks an unlabelled row)",
                                "Label the row or leave it out of this split.")
            name = names[value]
        else:
            name = value
            if names is not None and name not in names:
                raise self.fail(row, column, f"holds {name!r}{suggest(name, names)}, which is not one of the "
                                f"labels {names}", "Fix the row, or add the label to `labels:`.")
        return spec.label_renames.get(name, name)

    def _one_text(self, value: Any, row: int, column: str, what: str) -> str:
        if isinstance(value, (list, tuple)):
            choices = [t for t in (_text(v) for v in value) if t]
            value = choices[row_draw(self.spec.seed, self.source, row, len(choices))] if choices else None
        text = _text(value)
        if text is None:
            raise self.fail(row, column, f"has no {what}", f"Fill in the {what} or remove the row.")
        return text

    def adapt_row(self, row: Mapping[str, Any], index: int) -> dict[str, Any] | None:
        """One adapted row, or None for a skipped one (``bad_audio="skip"``). Raises `BadRowError`."""
        spec = self.spec
        index = int(row.get(ROW_INDEX_COLUMN, index))
        try:
            cell = audio_cell(row[spec.audio_column])
        except TypeError as err:
            raise self.fail(index, spec.audio_column, str(err), "Point audio_column at the clips.") from None
        problem = clip_problem(cell, spec.max_audio_seconds)
        if problem is not None:
            kind, description = problem
            if spec.bad_audio == "skip":
                self.skipped[kind] += 1
                logger.warning(
                    "Dataset %r, row %d, column %r: the clip %s; skipped (bad_audio: skip; %d skipped so far in this "
                    "process).", self.source, index, spec.audio_column, description, sum(self.skipped.values()),
                )
                return None
            raise self.fail(index, spec.audio_column, f"the clip {description}",
                            "Fix or remove the clip, or set `bad_audio: skip` to drop such rows (each is logged "
                            "and counted)" + (", or raise `max_audio_seconds`" if kind == "too long" else ""))
        phrasing = row_draw(spec.seed, self.source, index, len(spec.phrasings))
        fields: dict[str, str] = {}
        if spec.kind in ("transcription", "captioning"):
            what = "transcript" if spec.kind == "transcription" else "caption"
            answer = self._one_text(row[spec.text_column], index, spec.text_column, what)
        elif spec.kind == "classification":
            answer = self._label(row[spec.label_column], index)
            fields["labels"] = self._labels_text
        else:
            fields["question"] = self._one_text(row[spec.question_column], index, spec.question_column, "question")
            answer = self._one_text(row[spec.answer_column], index, spec.answer_column, "answer")
        prompt = spec.phrasings[phrasing].format(**fields)
        if spec.task_column:
            task = self._one_text(row[spec.task_column], index, spec.task_column, "task name")
        else:
            task = spec.task_name(self.source)
        return {
            "audio": cell, "messages": chat_messages(prompt, answer), "task": task, "answer": answer,
            "prompt": prompt, "instruction": phrasing, "source": self.source, SOURCE_ROW_COLUMN: index,
        }

    def adapt_batch(self, batch: Mapping[str, list], indices: list[int]) -> dict[str, list]:
        """`datasets.map(batched=True, with_indices=True)` form of :meth:`adapt_row`; skipped rows are left out."""
        columns = list(batch)
        out: dict[str, list] = {name: [] for name in ADAPTED_COLUMNS}
        for offset, index in enumerate(indices):
            adapted = self.adapt_row({name: batch[name][offset] for name in columns}, index)
            if adapted is not None:
                for name, value in adapted.items():
                    out[name].append(value)
        return out


def label_names_of(dataset: Dataset | IterableDataset, spec: TaskSpec, source: str) -> list[str] | None:
    """The label names of `spec.label_column`: its ClassLabel names, else `spec.labels`, else (a map-style
    dataset's string column) its distinct values, sorted; None when unknown (a streamed string column)."""
    import datasets

    feature = (dataset.features or {}).get(spec.label_column)
    if isinstance(feature, datasets.ClassLabel):
        if spec.labels is not None and list(spec.labels) != list(feature.names):
            raise ValueError(
                f"Dataset {source!r}: `labels:` {spec.labels} differ from the ClassLabel names {feature.names} of "
                f"column {spec.label_column!r}; leave `labels:` out (the names are read from the ClassLabel) or "
                "use label_renames."
            )
        return list(feature.names)
    if spec.labels is not None:
        return [str(label) for label in spec.labels]
    if isinstance(dataset, datasets.Dataset) and isinstance(feature, datasets.Value) and feature.dtype == "string":
        return sorted(str(v) for v in dataset.unique(spec.label_column) if v is not None)
    return None


def check_columns(present: Sequence[str], spec: TaskSpec, source: str) -> None:
    """Raise a `ValueError` naming the corpus and the column for the first column the spec needs and `present` (the
    corpus's columns) lacks."""
    present = [c for c in present if c != ROW_INDEX_COLUMN]
    for field_name, column in spec.required_columns().items():
        if column not in present:
            raise ValueError(
                f"Dataset {source!r}: column {column!r} ({field_name}) is missing{suggest(column, present)}; its "
                f"columns are {present}. Set `{field_name}:` in its mixture entry to the right column."
            )


def adapt_dataset(
    dataset: Dataset | IterableDataset, spec: TaskSpec, source: str, batch_size: int = 64
) -> Dataset | IterableDataset:
    """`dataset` (a `datasets.Dataset` or `IterableDataset`) as adapted rows (:func:`adapted_features`).

    A `Dataset` is mapped at once (bad rows raise here); an `IterableDataset` lazily, as it is read (bad rows raise
    when reached, naming the row). Rows are mapped `batch_size` at a time. Returns the same kind of dataset, with its
    :class:`TaskAdapter` (and so its skip counts) as ``.mowe_adapter``.
    """
    import datasets

    columns = dataset.column_names
    if columns is None:  # a stream whose features are not declared: its first row tells the columns
        columns = list(next(iter(dataset.take(1)), {}))
    check_columns(columns, spec, source)
    names = label_names_of(dataset, spec, source) if spec.kind == "classification" else None
    adapter = TaskAdapter(spec, source, names)
    feature = (dataset.features or {}).get(spec.audio_column)
    if isinstance(feature, datasets.Audio) and feature.decode:
        dataset = dataset.cast_column(spec.audio_column, datasets.Audio(decode=False))
    kwargs = dict(batched=True, batch_size=batch_size, with_indices=True, features=adapted_features())
    if isinstance(dataset, datasets.Dataset):
        kwargs["desc"] = f"adapting {source}"
    adapted = dataset.map(adapter.adapt_batch, remove_columns=columns, **kwargs)
    if isinstance(dataset, datasets.Dataset) and adapter.skipped:
        logger.warning("Dataset %r: skipped %d row(s) for bad audio: %s.", source, sum(adapter.skipped.values()),
                       dict(adapter.skipped))
    adapted.mowe_adapter = adapter
    return adapted


def spec_fields() -> tuple[str, ...]:
    """The field names of :class:`TaskSpec` (what a mixture entry may set for its task)."""
    return tuple(f.name for f in dataclasses.fields(TaskSpec))

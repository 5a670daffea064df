"""Training mixtures: several corpora, each adapted to its task, interleaved by weight and streamed; and their
held-out splits for evaluation. The mixture file format is documented in docs/DATA.md.

A mixture file (YAML, or JSON) is read by :func:`load_mixture` into a :class:`MixtureConfig`, checked field by field
before any data is touched (a typo in a key, a task kind or a layout, a weight of zero: a `ValueError` naming the
file, the entry and the field):

.. code-block:: yaml

    seed: 0
    datasets:
      - name: librispeech
        layout: librispeech
        path: data/LibriSpeech
        splits: {train: train-clean-100, test: test-clean}
        kind: transcription
        weight: 2
      - name: emotion
        layout: label_folders
        path: data/emotions
        kind: classification
        held_out: 0.2

:func:`training_stream` gives the ``train`` split of every entry that has one, adapted lazily and interleaved with
probabilities proportional to the weights (`datasets.interleave_datasets`): an `IterableDataset` that trains with
``max_steps`` and never holds the corpus in memory. :func:`evaluation_dataset` gives every entry's held-out split,
adapted, as one `Dataset` (scored per task, with :meth:`MixtureConfig.metrics`).

Tooling wing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import (
    BAD_AUDIO_POLICIES,
    DEFAULT_MAX_AUDIO_SECONDS,
    ROW_INDEX_COLUMN,
    TaskSpec,
    adapt_dataset,
    label_names_of,
    row_fraction,
    spec_fields,
    suggest,
)
from .layouts import LAYOUTS, LOCAL_SHARDS, STREAMING_LAYOUTS, load_layout

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

logger = logging.getLogger(__name__)

STOPPING_STRATEGIES = ("all_exhausted", "first_exhausted", "all_exhausted_without_replacement")

SHARED_SPEC_FIELDS = ("max_audio_seconds", "bad_audio", "seed")
"""Task settings a mixture sets once for every entry (an entry may override them)."""


@dataclass
class MixtureEntry:
    """One corpus of a mixture: where it is, which of its splits serve which mixture split, its weight, and its
    task (`spec`).

    Args:
        name: the corpus's name in scores, logs and errors (unique in the mixture).
        layout: how it is stored, one of `layouts.LAYOUTS` (default ``hub``).
        path: the Hub dataset id or the local file/folder (relative paths: from the current folder).
        spec: the task (a :class:`~modeling_mowe.data.adapters.TaskSpec`).
        config: the Hub dataset's configuration name.
        splits: mixture split -> the corpus's split (``{train: train.100, test: test}``). Without it a mixture
            split reads the corpus split of the same name. With it, the entry serves only the splits it lists (an
            evaluation-only corpus lists ``test`` alone).
        held_out: a fraction in (0, 1): that share of the corpus's train rows (drawn per row from the seed, the
            same every run) forms the mixture's ``test`` split and is left out of ``train``.
        weight: the entry's share of the training stream, relative to the others (> 0).
        streaming: read the corpus as a true stream (layouts ``hub``, ``parquet``, ``arrow``); default: true for
            ``hub``. Training streams every corpus either way: the other layouts from their index.
        eval_rows: evaluate on at most this many rows of the entry (the first ones of its split).
        options: layout options (``synthetic``: BenchmarkConfig fields; ``hub``: `load_dataset` arguments).
    """

    name: str
    spec: TaskSpec
    layout: str = "hub"
    path: str | None = None
    config: str | None = None
    splits: dict[str, str] | None = None
    held_out: float | None = None
    weight: float = 1.0
    streaming: bool | None = None
    eval_rows: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        where = f"dataset {self.name!r}"
        if self.layout not in LAYOUTS:
            raise ValueError(f"{where}: unknown layout {self.layout!r}{suggest(str(self.layout), LAYOUTS)}; the "
                             f"layouts are {', '.join(LAYOUTS)}.")
        if not self.path:
            raise ValueError(f"{where}: `path` is missing (a Hub dataset id or a local file/folder).")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"{where}: weight must be a positive number, got {self.weight!r}; leave the entry out "
                             "of the mixture, or give it splits: {test: ...} to only evaluate on it.")
        if self.held_out is not None:
            if not 0 < self.held_out < 1:
                raise ValueError(f"{where}: held_out is the share of rows held out, in (0, 1); got {self.held_out}.")
            if self.splits and "test" in self.splits:
                raise ValueError(f"{where}: give either held_out or splits: {{test: ...}}, not both.")
        if self.eval_rows is not None and self.eval_rows < 1:
            raise ValueError(f"{where}: eval_rows must be at least 1, got {self.eval_rows}.")
        if self.streaming and self.layout not in STREAMING_LAYOUTS:
            raise ValueError(f"{where}: streaming reads {', '.join(STREAMING_LAYOUTS)} as true streams; layout "
                             f"{self.layout!r} is read from its index (and training streams it anyway): leave "
                             "`streaming` out.")
        if self.config is not None and self.layout != "hub":
            raise ValueError(f"{where}: `config` names a Hub dataset configuration; layout {self.layout!r} has none.")

    @property
    def is_streaming(self) -> bool:
        return self.layout == "hub" if self.streaming is None else self.streaming

    def serves(self, split: str) -> bool:
        """Whether this entry has rows for the mixture split `split`."""
        if self.held_out is not None and split == "test":
            return True
        return self.splits is None or split in self.splits

    def source_split(self, split: str) -> str:
        """The corpus split read for the mixture split `split` (held-out rows come from ``train``)."""
        if self.held_out is not None and split == "test":
            split = "train"
        return (self.splits or {}).get(split, split)

    def load(self, split: str, streaming: bool | None = None) -> Dataset | IterableDataset:
        """The mixture split `split` of this corpus, adapted (`adapters.adapt_dataset`): a `Dataset`, or an
        `IterableDataset` with `streaming` (default: :attr:`is_streaming`).

        A corpus whose layout streams (`layouts.STREAMING_LAYOUTS`, with `streaming`) is read as a true stream; any
        other is loaded as a `Dataset` (a local tree's index of paths and texts, memory-mapped Arrow) that is then
        iterated lazily. Rows keep their index in the corpus split (``row``): held-out rows are drawn on it, so
        the draw does not depend on sharding or shuffling. A true stream has no such index: its held-out rows are
        drawn on each clip's file name (the audio cell's ``path``), and ``row`` counts rows as the stream gives them.
        """
        import datasets

        streaming = self.is_streaming if streaming is None else streaming
        true_stream = streaming and self.layout in STREAMING_LAYOUTS
        raw = load_layout(self.layout, self.path, self.source_split(split), streaming=true_stream,
                          config=self.config, audio_column=self.spec.audio_column, options=self.options)
        held_out = self.held_out is not None and split in ("train", "test")
        spec = self.spec
        if isinstance(raw, datasets.Dataset):
            if spec.kind == "classification" and spec.labels is None:
                # The labels of the whole split, so that train and held-out rows list the same ones in their prompts.
                spec = dataclasses.replace(spec, labels=label_names_of(raw, spec, self.name) or None)
            raw = raw.add_column(ROW_INDEX_COLUMN, list(range(len(raw))))
            if held_out:
                rows = held_out_rows(len(raw), self.held_out, self.spec.seed, self.name)
                if split == "train":
                    rows = sorted(set(range(len(raw))) - set(rows))
                raw = raw.select(rows)
            if self.eval_rows is not None and split != "train":
                raw = raw.select(range(min(self.eval_rows, len(raw))))
            if len(raw) == 0:
                raise ValueError(f"Dataset {self.name!r}: its {split!r} split has no rows"
                                 + (f" (held_out {self.held_out} of its train rows)" if held_out else "") + ".")
            if streaming:
                raw = raw.to_iterable_dataset(num_shards=max(1, min(LOCAL_SHARDS, len(raw))))
        else:
            if held_out:
                raw = raw.filter(_stream_held_out(self, keep_test=split == "test"))
            if self.eval_rows is not None and split != "train":
                raw = raw.take(self.eval_rows)
        return adapt_dataset(raw, spec, self.name)


def held_out_rows(n: int, share: float, seed: int, source: str) -> list[int]:
    """The held-out rows of a corpus split of `n` rows: the ``ceil(share * n)`` rows (at least one) with the lowest
    per-row draw (`adapters.row_fraction`), in order. Exact in size, the same in every run."""
    count = min(n, max(1, math.ceil(share * n)))
    return sorted(sorted(range(n), key=lambda row: row_fraction(seed, source, row))[:count])


def _stream_held_out(entry: MixtureEntry, keep_test: bool):
    """A row filter for a true stream: held out when the draw on the clip's file name is below the share."""
    column, seed, name, share = entry.spec.audio_column, entry.spec.seed, entry.name, entry.held_out

    def keep(row: dict) -> bool:
        cell = row.get(column)
        key = cell if isinstance(cell, str) else (cell or {}).get("path") if isinstance(cell, dict) else None
        if not key:
            raise ValueError(f"Dataset {name!r}: held_out on a streamed corpus draws rows by clip file name, and a "
                             f"row's {column!r} has none; give the entry `streaming: false` or `splits:` instead.")
        return (row_fraction(seed, name, os.path.basename(key)) < share) == keep_test

    return keep


@dataclass
class MixtureConfig:
    """A mixture (see the module docstring and docs/DATA.md).

    Args:
        datasets: the entries, at least one.
        seed: draws instruction phrasings, held-out rows, the interleaving order and the shuffle.
        stopping_strategy: `datasets.interleave_datasets`' rule for the end of one pass: ``all_exhausted`` (the
            default: every corpus is read to its end at least once, the small ones repeating in proportion to their
            weights), ``first_exhausted`` (the pass ends when one corpus runs out), or
            ``all_exhausted_without_replacement``. Training with ``max_steps`` starts a new pass when one ends.
        shuffle_buffer: rows each streamed corpus shuffles within (``IterableDataset.shuffle``; 0: corpus order).
        max_audio_seconds, bad_audio: defaults for every entry's task (see `TaskSpec`).
        source: the file it was read from (for messages).
    """

    datasets: list[MixtureEntry]
    seed: int = 0
    stopping_strategy: str = "all_exhausted"
    shuffle_buffer: int = 1000
    max_audio_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS
    bad_audio: str = "error"
    source: str = "<mixture>"

    def __post_init__(self):
        if not self.datasets:
            raise ValueError(f"{self.source}: `datasets` is empty; list at least one corpus.")
        if self.stopping_strategy not in STOPPING_STRATEGIES:
            raise ValueError(f"{self.source}: stopping_strategy {self.stopping_strategy!r} is not one of "
                             f"{STOPPING_STRATEGIES}{suggest(str(self.stopping_strategy), STOPPING_STRATEGIES)}.")
        if self.shuffle_buffer < 0:
            raise ValueError(f"{self.source}: shuffle_buffer must be >= 0, got {self.shuffle_buffer}.")
        names = [entry.name for entry in self.datasets]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"{self.source}: dataset names must be unique; repeated: {repeated}.")

    def entries_for(self, split: str) -> list[MixtureEntry]:
        return [entry for entry in self.datasets if entry.serves(split)]

    def metrics(self) -> dict[str, str]:
        """Task name -> metric (``wer`` or ``accuracy``) of every entry with a fixed task name; tasks taken from a
        column are scored by `evaluation.metric_for_task`'s default."""
        return {entry.spec.task_name(entry.name): entry.spec.metric_name
                for entry in self.datasets if not entry.spec.task_column}


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """`value` if it fits `annotation` (the simple types mixture fields use), ints accepted for floats; else a
    `ValueError` saying what was expected."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}.")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}.")
        return {_check_type(k, args[0], f"{where} key"): _check_type(v, args[1], f"{where}[{k!r}]")
                for k, v in value.items()}
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}.")
        return float(value)
    if annotation is int or annotation is bool or annotation is str:
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ValueError(f"{where} must be {annotation.__name__}, got {value!r}.")
        return value
    raise TypeError(f"unsupported annotation {annotation!r}")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _checked(cls, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`raw`'s values checked against the field types of the dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    return {key: _check_type(value, hints[key], f"{where}: {key}") for key, value in raw.items()}


def parse_entry(raw: Any, index: int, defaults: Mapping[str, Any], source: str) -> MixtureEntry:
    """One `datasets:` item -> a `MixtureEntry` (task fields go to its `TaskSpec`); errors name the file and item."""
    where = f"{source}, dataset {index + 1}"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: each item of `datasets` is a mapping (name, layout, path, kind, ...), "
                         f"got {raw!r}.")
    if isinstance(raw.get("name"), str):
        where = f"{source}, dataset {index + 1} ({raw['name']!r})"
    entry_keys = set(_fields(MixtureEntry)) - {"spec"}
    spec_keys = set(spec_fields())
    unknown = sorted(set(raw) - entry_keys - spec_keys)
    if unknown:
        key = unknown[0]
        raise ValueError(f"{where}: unknown key {key!r}{suggest(key, sorted(entry_keys | spec_keys))}. Keys: "
                         f"{', '.join(sorted(entry_keys | spec_keys))}.")
    for required in ("name", "kind"):
        if required not in raw:
            raise ValueError(f"{where}: `{required}` is missing.")
    try:
        spec_raw = {**defaults, **{k: v for k, v in raw.items() if k in spec_keys}}
        spec = TaskSpec(**_checked(TaskSpec, spec_raw, where))
        entry = MixtureEntry(spec=spec, **_checked(MixtureEntry, {k: v for k, v in raw.items() if k in entry_keys},
                                                  where))
    except ValueError as err:
        message = str(err)
        raise ValueError(message if message.startswith(source) else f"{where}: {message}") from None
    return entry


def parse_mixture(raw: Any, source: str = "<mixture>") -> MixtureConfig:
    """A mixture from its parsed file (a mapping), checked (see :func:`load_mixture`)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: a mixture file is a mapping with a `datasets` list, got {type(raw).__name__}.")
    top = set(_fields(MixtureConfig)) - {"source"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r}{suggest(unknown[0], sorted(top))}; the keys are "
                         f"{', '.join(sorted(top))}.")
    if not isinstance(raw.get("datasets"), list):
        raise ValueError(f"{source}: `datasets` must be a list of corpora.")
    settings = _checked(MixtureConfig, {k: v for k, v in raw.items() if k != "datasets"}, source)
    if settings.get("bad_audio", "error") not in BAD_AUDIO_POLICIES:
        raise ValueError(f"{source}: bad_audio must be one of {BAD_AUDIO_POLICIES}, got {settings['bad_audio']!r}.")
    defaults = {key: settings[key] for key in SHARED_SPEC_FIELDS if key in settings}
    entries = [parse_entry(item, i, defaults, source) for i, item in enumerate(raw["datasets"])]
    return MixtureConfig(datasets=entries, source=source, **settings)


def load_mixture(path: str | os.PathLike) -> MixtureConfig:
    """Read and check a mixture file: YAML (``.yaml``/``.yml``) or JSON (``.json``); see docs/DATA.md.

    Raises:
        ValueError: for a missing file, a syntax error, an unknown key (with the closest known one), a value of the
            wrong type, an unknown task kind or layout, a weight that is not positive, ... naming the file, the
            entry and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Mixture file {str(path)!r} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as err:  # yaml.YAMLError, json.JSONDecodeError
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {err}") from None
    return parse_mixture(raw, str(path))


def training_stream(config: MixtureConfig, split: str = "train") -> IterableDataset:
    """The mixture's `split` as one `datasets.IterableDataset` of adapted rows.

    Each entry that serves `split` is read as a stream (a local corpus from its index: clips are read by the
    collator, when their batch is made), adapted lazily, shuffled within ``shuffle_buffer`` rows, and the entries
    are interleaved with probabilities ``weight / sum(weights)`` (`datasets.interleave_datasets`, seeded, with
    ``config.stopping_strategy``). A Trainer needs ``max_steps`` for it (a stream has no length); it calls
    ``set_epoch`` each pass, which reshuffles.
    """
    import datasets

    entries = config.entries_for(split)
    if not entries:
        raise ValueError(f"{config.source}: no dataset has a {split!r} split (an entry with `splits:` serves only "
                         "the splits it lists).")
    streams = []
    for entry in entries:
        stream = entry.load(split, streaming=True)
        if config.shuffle_buffer:
            stream = stream.shuffle(seed=config.seed, buffer_size=config.shuffle_buffer)
        streams.append(stream)
    if len(streams) == 1:
        return streams[0]
    total = sum(entry.weight for entry in entries)
    return datasets.interleave_datasets(
        streams, probabilities=[entry.weight / total for entry in entries], seed=config.seed,
        stopping_strategy=config.stopping_strategy,
    )


def materialise(stream: IterableDataset) -> Dataset:
    """The rows of a (short) adapted stream as a `datasets.Dataset` with the same features.

    The audio column is written as a plain ``{"bytes", "path"}`` struct and then cast to ``Audio(decode=False)``:
    `datasets` (>= 4) would need ``torchcodec`` to encode an ``Audio`` value from Python, not to cast one."""
    import datasets

    features = datasets.Features(stream.features)
    features["audio"] = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    rows = datasets.Dataset.from_list(list(stream), features=features)
    return rows.cast_column("audio", datasets.Audio(decode=False))


def evaluation_dataset(config: MixtureConfig, split: str = "test", limit: int | None = None) -> Dataset:
    """Every entry's `split` (its held-out rows for ``test`` with ``held_out``), adapted and concatenated into one
    `datasets.Dataset` (in entry order), for `evaluation.evaluate_model(..., metrics=config.metrics())`.

    A streamed entry contributes its first ``eval_rows`` rows (or `limit`; one of them is required, so that a Hub
    corpus is not read whole). `limit` caps every entry's rows.
    """
    import datasets

    entries = config.entries_for(split)
    if not entries:
        raise ValueError(f"{config.source}: no dataset has a {split!r} split; give entries `held_out:` or "
                         f"`splits: {{{split}: ...}}`.")
    parts = []
    for entry in entries:
        rows = min(n for n in (entry.eval_rows, limit) if n is not None) if (entry.eval_rows or limit) else None
        if entry.is_streaming and rows is None:
            raise ValueError(f"{config.source}: dataset {entry.name!r} streams; give it `eval_rows:` (or pass a "
                             "limit) to evaluate on its first rows.")
        capped = dataclasses.replace(entry, eval_rows=rows)
        part = capped.load(split)
        if isinstance(part, datasets.IterableDataset):
            part = materialise(part)
        logger.info("Evaluation split %r of %r: %d rows.", split, entry.name, len(part))
        parts.append(part)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

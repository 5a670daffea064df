"""Corpora where users keep them: Hub datasets and the local layouts speech corpora ship in, as `datasets` splits.

:func:`load_layout` gives one split of a corpus as a `datasets.Dataset` (``streaming=False``) or
`IterableDataset` (``streaming=True``), audio undecoded: an ``Audio`` column (Hub, parquet, arrow, ``save_to_disk``)
or absolute file paths (local trees); `adapters.adapt_dataset` takes either. Layouts (:data:`LAYOUTS`):

``hub``            ``load_dataset(path, name=config, split=...)``: a Hub dataset id (or a local dataset script/folder).
``disk``           ``load_from_disk(path)``: a folder written by ``save_to_disk`` (a DatasetDict, or one Dataset as
                   split ``train``).
``parquet``,       files with an ``Audio`` feature, read by `datasets`' own builders: ``path`` is a file (split
``arrow``          ``train``) or a folder whose files `datasets` assigns to splits by name (``train-*.parquet``,
                   ``test/...``).
``audiofolder``    `datasets`' AudioFolder layout with metadata: ``metadata.csv`` (or ``.jsonl``) whose ``file_name``
                   column names clips relative to it, other columns as they are; split folders (``train/``,
                   ``test/``, each with its metadata) or one folder (split ``train``).
``librispeech``    a LibriSpeech tree: ``<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`` lines ``<id> <TEXT>`` with
                   ``<id>.flac`` beside them; ``path`` is one such tree (split ``train``) or holds several, one per
                   split (``train-clean-100/``, ``test-clean/``: name them in the entry's ``splits``). Columns:
                   ``audio``, ``text``, ``speaker_id``, ``chapter_id``, ``id``.
``label_folders``  one folder per label (``angry/*.wav``, ``happy/*.wav``, ...), or split folders of those
                   (``train/angry/*.wav``). Columns: ``audio``, ``label`` (a ``ClassLabel`` of the folder names, the
                   same for every split).
``jsonl``          JSON lines with an audio path column (relative to the file) and any others (AQA style:
                   ``{"audio": "clips/1.wav", "question": ..., "answer": ...}``); ``path`` is a file (split ``train``)
                   or a folder of ``<split>.jsonl``.
``synthetic``      the project's espeak-ng benchmark (`benchmark.build_benchmark`), built once into the cache folder
                   ``path``; ``options`` are `BenchmarkConfig` fields, or ``{"preset": "tiny"}``.

Why the audiofolder layout is read through the ``csv``/``json`` builders rather than ``load_dataset("audiofolder")``:
`datasets` 4 and later need ``torchcodec`` (with FFmpeg) to build any ``Audio`` column from files, even to store a
path; this package decodes with soundfile and keeps clips undecoded, so it reads the same metadata files with the
same rules (``file_name`` relative to the metadata file) and never needs ``torchcodec``. Local trees are listed into
an in-memory index of paths and texts; with ``streaming=True`` that index is iterated lazily and no clip is read
before the collator reads it.

Tooling wing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import suggest

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

    Split = Dataset | IterableDataset

LAYOUTS = ("hub", "disk", "parquet", "arrow", "audiofolder", "librispeech", "label_folders", "jsonl", "synthetic")

STREAMING_LAYOUTS = ("hub", "parquet", "arrow")
"""Layouts a mixture reads as true streams (entry ``streaming: true``); it loads the others whole as an index (paths
and texts, or a memory-mapped Arrow folder) and iterates that lazily, clips unread."""

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus")

METADATA_FILES = ("metadata.csv", "metadata.jsonl")

LOCAL_SHARDS = 16
"""Shards of a streamed local index (`Dataset.to_iterable_dataset`): DataLoader workers split shards between them."""


def _missing(layout: str, path: Path, what: str) -> ValueError:
    return ValueError(f"{layout} layout at {str(path)!r}: {what}")


def _split_folder(layout: str, root: Path, split: str, has_data) -> Path:
    """`root/split` when it holds data, else `root` itself for split ``train`` when it does; else a clear error."""
    if (root / split).is_dir() and has_data(root / split):
        return root / split
    if has_data(root):
        if split == "train":
            return root
        raise _missing(layout, root, f"there is no split {split!r}: the folder is one split (train); give `held_out:` "
                       "to hold rows out, or lay the splits out as subfolders.")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and has_data(p)) if root.is_dir() else []
    raise _missing(layout, root, f"no split {split!r}{suggest(split, folders)}; splits found: {folders or 'none'}.")


def _from_index(rows: dict[str, list], features, streaming: bool):
    """A `Dataset` of a local index (paths and texts), or its lazily iterated `IterableDataset`."""
    import datasets

    dataset = datasets.Dataset.from_dict(rows, features=features)
    if streaming:
        return dataset.to_iterable_dataset(num_shards=max(1, min(LOCAL_SHARDS, len(dataset))))
    return dataset


def _has_transcripts(folder: Path) -> bool:
    return any(folder.glob("*/*/*.trans.txt"))


def load_librispeech(path: Path, split: str, streaming: bool = False) -> Split:
    """A LibriSpeech-style tree (see the module docstring) as rows ``audio`` (absolute path), ``text``,
    ``speaker_id``, ``chapter_id``, ``id``, in sorted order. A transcript line whose clip is missing keeps its
    path; the adapter reports it."""
    import datasets

    root = _split_folder("librispeech", path, split, _has_transcripts)
    rows: dict[str, list] = {"audio": [], "text": [], "speaker_id": [], "chapter_id": [], "id": []}
    for transcript in sorted(root.glob("*/*/*.trans.txt")):
        speaker, chapter = transcript.parent.parent.name, transcript.parent.name
        for number, line in enumerate(transcript.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            utterance, _, text = line.strip().partition(" ")
            if not text.strip():
                raise _missing("librispeech", transcript, f"line {number} ({line!r}) has an id but no transcript.")
            candidates = [transcript.parent / (utterance + ext) for ext in AUDIO_EXTENSIONS]
            clip = next((c for c in candidates if c.is_file()), candidates[AUDIO_EXTENSIONS.index(".flac")])
            for column, value in zip(rows, (str(clip.resolve()), text.strip(), speaker, chapter, utterance)):
                rows[column].append(value)
    text = datasets.Value("string")
    features = datasets.Features({name: text for name in rows})
    return _from_index(rows, features, streaming)


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)


def _has_label_folders(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_dir() and _audio_files(p) for p in folder.iterdir())


def load_label_folders(path: Path, split: str, streaming: bool = False) -> Split:
    """A folder-per-label tree as rows ``audio`` (absolute path) and ``label`` (a ``ClassLabel`` of the label folder
    names, the union over every split folder, so each split has the same names)."""
    import datasets

    root = _split_folder("label_folders", path, split, _has_label_folders)
    splits = [root] if root == path else [p for p in path.iterdir() if _has_label_folders(p)]
    names = sorted({label.name for folder in splits for label in folder.iterdir() if label.is_dir()
                    and _audio_files(label)})
    rows: dict[str, list] = {"audio": [], "label": []}
    for label in sorted(p for p in root.iterdir() if p.is_dir()):
        for clip in _audio_files(label):
            rows["audio"].append(str(clip.resolve()))
            rows["label"].append(names.index(label.name))
    features = datasets.Features({"audio": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return _from_index(rows, features, streaming)


def _resolve_paths(dataset, column: str, base: Path, where: str):
    """`dataset` with `column`'s relative paths made absolute against `base` (lazily for a stream)."""
    columns = dataset.column_names
    if columns is not None and column not in columns:
        raise ValueError(f"{where}: no column {column!r} with the clip paths{suggest(column, columns)}; its columns "
                         f"are {columns}. Set `audio_column:` in the mixture entry.")

    def resolve(batch):
        return {column: [None if p is None else str((base / p).resolve()) if isinstance(p, str) else p
                         for p in batch[column]]}

    import datasets

    if isinstance(dataset, datasets.Dataset):
        return dataset.map(resolve, batched=True, desc=f"resolving paths of {where}")
    return dataset.map(resolve, batched=True, features=dataset.features)


def load_audiofolder(path: Path, split: str, streaming: bool = False) -> Split:
    """The AudioFolder layout with metadata (see the module docstring): the metadata's columns, with ``file_name``
    renamed ``audio`` and resolved to absolute paths."""
    import datasets

    def metadata_of(folder: Path) -> Path | None:
        return next((folder / name for name in METADATA_FILES if (folder / name).is_file()), None)

    root = _split_folder("audiofolder", path, split, lambda folder: metadata_of(folder) is not None)
    metadata = metadata_of(root)
    builder = "csv" if metadata.suffix == ".csv" else "json"
    dataset = datasets.load_dataset(builder, data_files=str(metadata), split="train", streaming=streaming)
    columns = dataset.column_names or []
    if "file_name" not in columns:
        raise _missing("audiofolder", metadata, f"no `file_name` column (the clip paths, relative to the metadata "
                       f"file); its columns are {columns}.")
    dataset = dataset.rename_column("file_name", "audio")
    return _resolve_paths(dataset, "audio", root, str(metadata))


def load_jsonl(path: Path, split: str, streaming: bool = False, audio_column: str = "audio") -> Split:
    """JSON lines with a clip path column (`audio_column`, relative to the file): ``path`` is the file (split
    ``train``) or a folder of ``<split>.jsonl``."""
    import datasets

    if path.is_dir():
        file = path / f"{split}.jsonl"
        if not file.is_file():
            found = sorted(p.stem for p in path.glob("*.jsonl"))
            raise _missing("jsonl", path, f"no {split}.jsonl{suggest(split, found)}; splits found: {found or 'none'}.")
    elif split != "train":
        raise _missing("jsonl", path, f"there is no split {split!r}: one file is one split (train); give `held_out:` "
                       "or a folder of <split>.jsonl files.")
    else:
        file = path
    dataset = datasets.load_dataset("json", data_files=str(file), split="train", streaming=streaming)
    return _resolve_paths(dataset, audio_column, file.parent, str(file))


def load_files(builder: str, path: Path, split: str, streaming: bool = False) -> Split:
    """Parquet or arrow files with their features (an ``Audio`` column stays one), through `datasets`' builder."""
    import datasets

    if path.is_file():
        if split != "train":
            raise _missing(builder, path, f"there is no split {split!r}: one file is one split (train); give "
                           "`held_out:` or a folder with split files.")
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
    data = datasets.load_dataset(builder, data_dir=str(path), streaming=streaming)
    if split not in data:
        raise _missing(builder, path, f"no split {split!r}{suggest(split, list(data))}; splits found: {list(data)}.")
    return data[split]


def load_synthetic(path: Path, split: str, streaming: bool = False, options: Mapping[str, Any] | None = None) -> Split:
    """The espeak-ng benchmark, built (once) into the cache folder `path`."""
    from .benchmark import SPLITS, BenchmarkConfig, build_benchmark

    options = dict(options or {})
    preset = options.pop("preset", None)
    if preset not in (None, "tiny"):
        raise ValueError(f"synthetic layout: unknown preset {preset!r}; the one preset is 'tiny'.")
    config = BenchmarkConfig.tiny() if preset == "tiny" else BenchmarkConfig()
    try:
        config = dataclasses.replace(config, **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    except TypeError as err:
        raise ValueError(f"synthetic layout: {err}; options are BenchmarkConfig fields or preset.") from None
    if split not in SPLITS:
        raise ValueError(f"synthetic layout: no split {split!r}; its splits are {list(SPLITS)}.")
    dataset = build_benchmark(path, config, progress=False)[split]
    return dataset.to_iterable_dataset(num_shards=max(1, min(LOCAL_SHARDS, len(dataset)))) if streaming else dataset


def undecoded(dataset: Split) -> Split:
    """`dataset` with each ``Audio`` column cast to ``Audio(decode=False)``: clips stay ``{"bytes", "path"}`` until the
    collator decodes them (with soundfile; `datasets` would need torchcodec)."""
    import datasets

    for name, feature in (dataset.features or {}).items():
        if isinstance(feature, datasets.Audio) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Audio(sampling_rate=feature.sampling_rate, decode=False))
    return dataset


def load_layout(
    layout: str,
    path: str | os.PathLike,
    split: str,
    streaming: bool = False,
    config: str | None = None,
    audio_column: str = "audio",
    options: Mapping[str, Any] | None = None,
) -> Split:
    """One split of a corpus (see the module docstring) as a `datasets.Dataset`, or with `streaming` an
    `IterableDataset` that reads rows (and the collator clips) only as training consumes them.

    Args:
        layout: one of :data:`LAYOUTS`.
        path: a Hub dataset id (``hub``) or a local file/folder.
        split: the split's name as the corpus has it (``train.100``, ``test-clean``, ...).
        config: the Hub dataset's configuration (``hub`` only).
        audio_column: the clip path column of a ``jsonl`` file.
        options: ``synthetic``'s `BenchmarkConfig` fields; for ``hub``, extra `load_dataset` keyword arguments.

    Raises:
        ValueError: for an unknown layout, a missing path, or a split the corpus does not have.
    """
    import datasets

    if layout not in LAYOUTS:
        raise ValueError(
            f"Unknown layout {layout!r}{suggest(str(layout), LAYOUTS)}; the layouts are {', '.join(LAYOUTS)}."
        )
    if layout == "hub":
        data = datasets.load_dataset(str(path), name=config, split=split, streaming=streaming, **dict(options or {}))
        return undecoded(data)
    local = Path(path)
    if layout == "synthetic":
        return load_synthetic(local, split, streaming, options)
    if not local.exists():
        raise ValueError(f"{layout} layout: {str(local)!r} does not exist (relative paths are taken from the "
                         f"current folder, {os.getcwd()!r}).")
    if layout == "disk":
        data = datasets.load_from_disk(str(local))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise _missing("disk", local, f"no split {split!r}{suggest(split, list(data))}; splits: {list(data)}.")
            data = data[split]
        elif split != "train":
            raise _missing("disk", local, f"it holds one Dataset (split train), not {split!r}.")
        data = undecoded(data)
        return data.to_iterable_dataset(num_shards=max(1, min(LOCAL_SHARDS, len(data)))) if streaming else data
    if layout in ("parquet", "arrow"):
        return undecoded(load_files(layout, local, split, streaming))
    if layout == "audiofolder":
        return load_audiofolder(local, split, streaming)
    if layout == "librispeech":
        return load_librispeech(local, split, streaming)
    if layout == "label_folders":
        return load_label_folders(local, split, streaming)
    return load_jsonl(local, split, streaming, audio_column)

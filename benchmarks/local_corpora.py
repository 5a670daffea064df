"""Small copies of the corpus layouts users keep on disk, written on the spot (soundfile): what the tests of
`modeling_mowe.data` read and what `bench_adapters.py` streams. Clips are short tones (distinct per clip), 16 kHz.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16_000


def tone(seconds: float, index: int = 0, sampling_rate: int = SR) -> np.ndarray:
    """A float32 sine of `seconds`, its pitch set by `index` (so clips differ)."""
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    return (0.3 * np.sin(2 * np.pi * (150 + 7 * (index % 100)) * t)).astype(np.float32)


def write_librispeech(
    root: Path, splits: dict[str, tuple[int, int]], seconds: float = 0.3, start: int = 0
) -> dict[str, list[str]]:
    """A LibriSpeech tree: for each split folder name, `(speakers, utterances per speaker)`, one chapter each;
    ``<split>/<speaker>/<chapter>/<speaker>-<chapter>-<n>.flac`` and the chapter's ``.trans.txt`` (uppercase text,
    as LibriSpeech). Returns each split's transcripts in tree order."""
    texts: dict[str, list[str]] = {}
    index, speaker_count = start, 0
    for split, (speakers, per_speaker) in splits.items():
        texts[split] = []
        for _ in range(speakers):
            speaker_id, chapter_id = f"{100 + speaker_count}", "7"
            speaker_count += 1
            folder = root / split / speaker_id / chapter_id
            folder.mkdir(parents=True, exist_ok=True)
            lines = []
            for n in range(per_speaker):
                utterance = f"{speaker_id}-{chapter_id}-{n:04d}"
                sf.write(folder / f"{utterance}.flac", tone(seconds, index), SR)
                text = f"UTTERANCE {index} OF SPEAKER {speaker_id}"
                lines.append(f"{utterance} {text}")
                texts[split].append(text)
                index += 1
            (folder / f"{speaker_id}-{chapter_id}.trans.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return texts


def write_label_folders(root: Path, labels: dict[str, int], seconds: float = 0.3, split: str | None = None) -> None:
    """One folder per label (``<root>[/<split>]/<label>/<n>.wav``), `labels[label]` clips each."""
    base = root / split if split else root
    for offset, (label, count) in enumerate(labels.items()):
        (base / label).mkdir(parents=True, exist_ok=True)
        for n in range(count):
            sf.write(base / label / f"{n}.wav", tone(seconds, 10 * offset + n), SR, subtype="PCM_16")


def write_audiofolder(root: Path, splits: dict[str, list[str]], seconds: float = 0.3) -> None:
    """`datasets`' AudioFolder layout: ``<root>/<split>/clips/<n>.wav`` and ``<root>/<split>/metadata.csv`` with
    columns ``file_name`` (relative to the metadata file) and ``transcription``."""
    for split, texts in splits.items():
        (root / split / "clips").mkdir(parents=True, exist_ok=True)
        lines = ["file_name,transcription"]
        for n, text in enumerate(texts):
            sf.write(root / split / "clips" / f"{n}.wav", tone(seconds, n), SR, subtype="PCM_16")
            lines.append(f"clips/{n}.wav,{text}")
        (root / split / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_aqa_jsonl(path: Path, rows: list[tuple[str, str]], seconds: float = 0.3) -> None:
    """AQA-style JSON lines ``{"audio": "clips/<n>.wav", "question": ..., "answer": ...}`` with clips beside the
    file (paths relative to it)."""
    (path.parent / "clips").mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for n, (question, answer) in enumerate(rows):
            sf.write(path.parent / "clips" / f"{n}.wav", tone(seconds, n), SR, subtype="PCM_16")
            out.write(json.dumps({"audio": f"clips/{n}.wav", "question": question, "answer": answer}) + "\n")


def wav_bytes(seconds: float, index: int = 0) -> bytes:
    import io

    buffer = io.BytesIO()
    sf.write(buffer, tone(seconds, index), SR, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def audio_dataset(texts: list[str], seconds: float = 0.3):
    """A `datasets.Dataset` with an ``Audio`` column holding the clips' bytes and a ``text`` column: what parquet
    and arrow files on the Hub hold. (Built as a struct and cast: encoding ``Audio`` values needs torchcodec.)"""
    import datasets

    cells = [{"bytes": wav_bytes(seconds, n), "path": f"clip{n}.wav"} for n in range(len(texts))]
    data = datasets.Dataset.from_dict({"audio": cells, "text": texts})
    return data.cast_column("audio", datasets.Audio())

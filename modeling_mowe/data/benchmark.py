"""A synthetic multi-task speech benchmark made on the spot (docs/ARCHITECTURE.md, "The synthetic benchmark").

Speech comes from the ``espeak-ng`` command-line synthesiser (22.05 kHz, resampled to 16 kHz with ``soxr``);
sounds are generated with numpy. Nothing is downloaded. Seven tasks, one instruction each (the first five are built by
default, :data:`DEFAULT_TASKS`; ``emotion`` and ``same_speaker`` on request, e.g. ``BenchmarkConfig(tasks=TASKS)``):

========  ======================================  ==================================================
task      prompt                                  answers
========  ======================================  ==================================================
asr       "Transcribe the audio."                 the English sentence, lowercase, no punctuation
gender    "Is the speaker male or female?"        ``male`` | ``female``
language  "Which language is spoken?"             ``english`` | ``german`` | ``french`` | ``spanish`` |
                                                  ``italian`` | ``dutch``
rate      "Is the speech slow, normal or fast?"   ``slow`` | ``normal`` | ``fast``
count     "How many beeps do you hear?"           ``one`` | ``two`` | ``three`` | ``four`` | ``five``
emotion   "Which emotion does the voice convey?"  ``neutral`` | ``happy`` | ``sad`` | ``angry``
same_     "Are the two sentences spoken by the    ``same`` | ``different``
speaker   same person or by different people?"
========  ======================================  ==================================================

``same_speaker`` is speaker verification in one clip: two sentences with a pause between them, by one voice or by two
voices of the same gender at the same rate (so neither gender nor rate gives the answer away).

``emotion`` is a prosody-style stand-in for emotion recognition (the paper judges its pools on it): the same English
sentences spoken with an SSML ``<prosody>`` profile per label (:data:`EMOTION_PROSODY`: pitch, pitch range, rate and
volume, each jittered per clip), by every voice of the split. Peak normalisation removes the volume cue, and voices
differ in their own pitch, so the answer lies in pitch and melody relative to the voice, not in loudness.

Splits. ``train`` and ``validation`` share the training conditions (voices, rate values, beep frequencies);
``test`` is held out: its voice variants, its speaking-rate values (odd wpm; training uses even), its beep
frequency bands and its sentences never occur in ``train``. Sentences are assigned to a split by a stable hash of
their text (70 % train, 10 % validation, 20 % test pools), so no sentence crosses splits, for every task. ``far``
(built only when ``far_per_task > 0``) moves further from the training conditions than ``test`` and shares none of
train's or test's conditions: its own voice variants, each with its base pitch moved (espeak-ng ``-p``), speaking
rates outside every training and test range, beep bands below and above all others, and the validation pool's
sentences. :func:`split_overlap` measures all of this on a built :class:`datasets.DatasetDict`. With
``BenchmarkConfig.train_pitch_range`` the training clips' pitch moves too (so far's pitch moves are no longer unseen);
with ``BenchmarkConfig.train_formant_range`` their formants too, so that no two training clips share a voice.

This module belongs to the tooling wing; it reads audio with the model's own helpers (``feature_extraction_mowe``).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from ..encoders import SAMPLING_RATE
from ..feature_extraction_mowe import downmix, read_audio, resample

GENERATOR_VERSION = "1"

SPLITS = ("train", "validation", "test", "far")
"""Every split this module can build; ``far`` only when :attr:`BenchmarkConfig.far_per_task` is positive."""
DEFAULT_TASKS = ("asr", "gender", "language", "rate", "count")
"""The tasks :class:`BenchmarkConfig` builds by default (the demo's)."""
STUDY_TASKS = (*DEFAULT_TASKS, "emotion")
"""The demo's tasks and emotion: the study's six (the task its specialists are made for)."""
TASKS = (*STUDY_TASKS, "same_speaker")
"""Every task this module can build."""

TASK_PROMPTS = {
    "asr": "Transcribe the audio.",
    "gender": "Is the speaker male or female?",
    "language": "Which language is spoken?",
    "rate": "Is the speech slow, normal or fast?",
    "count": "How many beeps do you hear?",
    "emotion": "Which emotion does the voice convey?",
    "same_speaker": "Are the two sentences spoken by the same person or by different people?",
}

COUNT_WORDS = ("one", "two", "three", "four", "five")

SENTENCE_SEPARATOR = " | "
"""Between the two sentences of a ``same_speaker`` row's ``sentence`` (its ``voice`` holds the two voices, comma
separated)."""

TASK_LABELS: dict[str, tuple[str, ...] | None] = {
    "asr": None,
    "gender": ("male", "female"),
    "language": ("english", "german", "french", "spanish", "italian", "dutch"),
    "rate": ("slow", "normal", "fast"),
    "count": COUNT_WORDS,
    "emotion": ("neutral", "happy", "sad", "angry"),
    "same_speaker": ("same", "different"),
}
"""The closed answer vocabulary of each classification task (``None``: free text)."""

ESPEAK_LANGUAGE = {
    "english": "en",
    "german": "de",
    "french": "fr",
    "spanish": "es",
    "italian": "it",
    "dutch": "nl",
}

VOICE_VARIANTS = {
    "train": {
        "male": ("m1", "m2", "m3", "m5", "m6", "adam", "john", "max", "robert"),
        "female": ("f1", "f2", "f3", "Annie", "belinda", "steph", "Alicia"),
    },
    "test": {
        "male": ("m4", "m7", "paul", "david"),
        "female": ("f4", "f5", "Andrea", "linda"),
    },
    "far": {
        "male": ("m8", "michel", "travis", "victor"),
        "female": ("aunty", "steph2", "anika", "grandma"),
    },
}
"""espeak-ng voice variants (``<lang>+<variant>``) by split group and gender; ``validation`` uses ``train``'s."""

FAR_PITCH_RANGE = (30, 70)
"""espeak-ng ``-p`` base pitch (0-99; a voice's default is 50) of ``far`` clips, uniform per clip."""

RATE_RANGES = {"slow": (90, 120), "normal": (160, 190), "fast": (260, 320)}
"""Words per minute (espeak-ng ``-s``), inclusive. Train/validation draw even values, test odd ones."""

FAR_RATE_RANGES = {"slow": (75, 89), "normal": (191, 205), "fast": (321, 350)}
"""The ``far`` split's rate-task values: outside every range of :data:`RATE_RANGES`, either parity."""

NEUTRAL_RATE_RANGE = (140, 200)
"""Speaking rate of the tasks that are not about rate."""

EMOTION_PROSODY = {
    "neutral": {"pitch": 0, "range": 0, "rate": 0, "volume": 0},
    "happy": {"pitch": 30, "range": 70, "rate": 10, "volume": 20},
    "sad": {"pitch": -20, "range": -60, "rate": -20, "volume": -30},
    "angry": {"pitch": 10, "range": 30, "rate": 20, "volume": 50},
}
"""SSML ``<prosody>`` changes in percent per emotion label; each clip adds uniform jitter of
+-:data:`EMOTION_JITTER` points to each."""

EMOTION_JITTER = 8

BEEP_BANDS = {
    "train": ((300.0, 700.0), (1100.0, 1500.0), (1900.0, 2300.0)),
    "test": ((700.0, 1100.0), (1500.0, 1900.0)),
    "far": ((150.0, 300.0), (2300.0, 2800.0)),
}
"""Beep frequency bands in Hz by split group; the test bands lie between the training ones, the far bands outside
all of them."""

ASR_WORDS = {
    "det": ("the", "a", "my", "your"),
    "adj": ("big", "small", "tall", "red", "green", "happy", "little", "new"),
    "agent": ("dog", "cat", "man", "girl", "boy", "bird", "horse", "child"),
    "thing": ("ball", "book", "kite", "box", "cup", "hat", "tree"),
    "vt": ("sees", "likes", "finds", "wants", "takes", "has"),
    "vi": ("runs", "sleeps", "sings", "jumps", "walks", "waits"),
    "adv": ("today", "now", "here", "again"),
}
"""The English ASR vocabulary (43 words) and its grammar's word classes."""

LANGUAGE_PHRASES = {
    "english": {
        "subj": ("the dog", "the cat", "the man", "the woman", "the child", "the bird", "the teacher", "my friend"),
        "verb": ("sees", "likes", "has", "wants", "finds", "buys"),
        "obj": ("the house", "the ball", "the book", "the car", "the apple", "the door", "the flower", "the table"),
        "adv": ("today", "now"),
    },
    "german": {
        "subj": (
            "der hund",
            "die katze",
            "der mann",
            "die frau",
            "das kind",
            "der vogel",
            "der lehrer",
            "mein freund",
        ),
        "verb": ("sieht", "mag", "hat", "will", "findet", "kauft"),
        "obj": ("das haus", "den ball", "das buch", "das auto", "den apfel", "die tür", "die blume", "den tisch"),
        "adv": ("heute", "jetzt"),
    },
    "french": {
        "subj": ("le chien", "le chat", "l'homme", "la femme", "l'enfant", "l'oiseau", "le professeur", "mon ami"),
        "verb": ("voit", "aime", "a", "veut", "trouve", "achète"),
        "obj": ("la maison", "le ballon", "le livre", "la voiture", "la pomme", "la porte", "la fleur", "la table"),
        "adv": ("aujourd'hui", "maintenant"),
    },
    "spanish": {
        "subj": ("el perro", "el gato", "el hombre", "la mujer", "el niño", "el pájaro", "el profesor", "mi amigo"),
        "verb": ("ve", "quiere", "tiene", "busca", "encuentra", "compra"),
        "obj": ("la casa", "la pelota", "el libro", "el coche", "la manzana", "la puerta", "la flor", "la mesa"),
        "adv": ("hoy", "ahora"),
    },
    "italian": {
        "subj": ("il cane", "il gatto", "l'uomo", "la donna", "il bambino", "l'uccello", "il maestro", "il mio amico"),
        "verb": ("vede", "ama", "ha", "vuole", "trova", "compra"),
        "obj": ("la casa", "la palla", "il libro", "la macchina", "la mela", "la porta", "il fiore", "il tavolo"),
        "adv": ("oggi", "adesso"),
    },
    "dutch": {
        "subj": ("de hond", "de kat", "de man", "de vrouw", "het kind", "de vogel", "de leraar", "mijn vriend"),
        "verb": ("ziet", "heeft", "wil", "vindt", "koopt", "zoekt"),
        "obj": ("het huis", "de bal", "het boek", "de auto", "de appel", "de deur", "de bloem", "de tafel"),
        "adv": ("vandaag", "nu"),
    },
}
"""Subject-verb-object(-adverb) phrases per language for the language-identification task."""

_SPLIT_INDEX = {name: i for i, name in enumerate(SPLITS)}
_TASK_INDEX = {name: i for i, name in enumerate(TASKS)}
_PITCH_STREAM = 1000  # the seed-sequence entry of the training pitch draws, apart from every other stream
_FORMANT_STREAM = 1001  # the same for the training formant draws


@dataclass
class BenchmarkConfig:
    """Settings of :func:`build_benchmark`; every field changes the data and hence :meth:`fingerprint`.

    Args:
        seed: Seed of every random choice (sentences, voices, rates, beeps, noise, padding).
        train_per_task, validation_per_task, test_per_task, far_per_task: Rows per task in each split, before
            ``scale`` (``far``, default 0: not built).
        scale: Multiplier of the three counts (rounded, at least 1 row per task and split when the count is > 0).
        sampling_rate: Output sampling rate in Hz (the wav bytes' rate).
        tasks: Which tasks to build, a subset of :data:`TASKS` (default: :data:`DEFAULT_TASKS`).
        languages: Languages of the ``language`` task, a subset of :data:`ESPEAK_LANGUAGE`'s keys.
        train_pitch_range: ``(low, high)``, espeak-ng ``-p`` base pitch (0-99) drawn uniformly per ``train`` and
            ``validation`` speech clip, so a handful of voices sounds like many; ``None`` (default): each voice's
            own. Drawn from a stream of its own, so every other choice (and ``test``, ``far``) stays the same.
        train_formant_range: ``(low, high)``, a factor drawn uniformly per ``train`` and ``validation`` speech clip
            (to 0.01) by which every formant frequency of the clip's espeak-ng voice variant is scaled, as a longer
            or shorter vocal tract would; ``None`` (default): the variant's own. A stream of its own, as the pitch.
    """

    seed: int = 0
    train_per_task: int = 300
    validation_per_task: int = 40
    test_per_task: int = 40
    far_per_task: int = 0
    scale: float = 1.0
    sampling_rate: int = SAMPLING_RATE
    tasks: tuple[str, ...] = DEFAULT_TASKS
    languages: tuple[str, ...] = tuple(ESPEAK_LANGUAGE)
    train_pitch_range: tuple[int, int] | None = None
    train_formant_range: tuple[float, float] | None = None

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        self.languages = tuple(self.languages)
        if self.train_pitch_range is not None:
            pitch = tuple(self.train_pitch_range)
            if len(pitch) != 2 or not 0 <= pitch[0] <= pitch[1] <= 99:
                raise ValueError(f"train_pitch_range must be (low, high) with 0 <= low <= high <= 99 (espeak-ng -p), "
                                 f"got {self.train_pitch_range}")
            self.train_pitch_range = (int(pitch[0]), int(pitch[1]))
        if self.train_formant_range is not None:
            scale = tuple(self.train_formant_range)
            if len(scale) != 2 or not 0.7 <= scale[0] <= scale[1] <= 1.3:
                raise ValueError(f"train_formant_range must be (low, high) with 0.7 <= low <= high <= 1.3 (a factor "
                                 f"on the voice's formant frequencies), got {self.train_formant_range}")
            self.train_formant_range = (float(scale[0]), float(scale[1]))
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
        unknown = [lang for lang in self.languages if lang not in ESPEAK_LANGUAGE]
        if unknown or len(self.languages) < 2:
            raise ValueError(f"languages must be 2 or more of {tuple(ESPEAK_LANGUAGE)}, got {self.languages}")
        for name in ("train_per_task", "validation_per_task", "test_per_task", "far_per_task"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if int(self.sampling_rate) <= 0:
            raise ValueError(f"sampling_rate must be a positive number of Hz, got {self.sampling_rate}")

    @classmethod
    def tiny(cls, **overrides) -> BenchmarkConfig:
        """A config of a handful of rows (4 train, 2 validation, 2 test per task) that builds in about a second."""
        settings = {"train_per_task": 4, "validation_per_task": 2, "test_per_task": 2, **overrides}
        return cls(**settings)

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits :func:`build_benchmark` builds: train, validation and test, and far when it has rows."""
        return SPLITS if self.far_per_task else SPLITS[:3]

    def num_rows(self, split: str) -> int:
        """Rows per task in ``split`` after ``scale``."""
        count = int(getattr(self, f"{split}_per_task"))
        return 0 if count == 0 else max(1, round(count * self.scale))

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-able dict."""
        out = dataclasses.asdict(self)
        out["tasks"] = list(self.tasks)
        out["languages"] = list(self.languages)
        for name in ("train_pitch_range", "train_formant_range"):
            if out[name] is None:  # absent, so the fingerprints of earlier configs (and caches) hold
                del out[name]
            else:
                out[name] = list(out[name])
        return out

    def fingerprint(self) -> str:
        """A 16-hex-digit hash of the settings, :data:`GENERATOR_VERSION` and the espeak-ng version.

        Two configs with the same fingerprint produce the same bytes, so a cache under this name can be reused.
        """
        payload = {"settings": self.to_dict(), "generator": GENERATOR_VERSION, "espeak": espeak_version()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- synthesis


def _espeak_binary() -> str:
    binary = shutil.which("espeak-ng") or shutil.which("espeak")
    if binary is None:
        raise RuntimeError(
            "The synthetic benchmark needs the espeak-ng speech synthesiser, which is not on PATH. "
            "Install it (Debian/Ubuntu: `apt-get install espeak-ng`; macOS: `brew install espeak-ng`)."
        )
    return binary


@functools.lru_cache(maxsize=1)
def _espeak_version_output() -> str:
    """``espeak-ng --version``: its version, then ``Data at: <the installed data folder>``."""
    return subprocess.run([_espeak_binary(), "--version"], capture_output=True, text=True, check=True).stdout


def espeak_version() -> str:
    """The first line of ``espeak-ng --version`` (part of the cache fingerprint), or ``"missing"``."""
    try:
        out = _espeak_version_output()
    except (RuntimeError, OSError, subprocess.CalledProcessError):
        return "missing"
    return " ".join(out.split("Data at:")[0].split())


def _espeak_data() -> Path:
    return Path(_espeak_version_output().split("Data at:")[-1].strip())


_VARIANT_LOCK = threading.Lock()


@functools.cache
def _formant_overlay(percent: int) -> Path:
    """A temporary espeak-ng data folder (for ``--path``) in which every variant has its formants at ``percent`` %
    of their frequency: links to the installed folder's entries, and a ``voices/!v`` of its own to which
    :func:`_formant_variant` writes the variants used. One folder per factor, with the variants' own names, keeps
    espeak-ng's list of voices below its limit of 350."""
    installed = _espeak_data()
    overlay = Path(tempfile.mkdtemp(prefix=f"mowe-espeak-formants{percent}-"))
    atexit.register(shutil.rmtree, overlay, ignore_errors=True)
    for entry in installed.iterdir():
        if entry.name != "voices":
            (overlay / entry.name).symlink_to(entry)
    (overlay / "voices" / "!v").mkdir(parents=True)
    for entry in (installed / "voices").iterdir():
        if entry.name != "!v":
            (overlay / "voices" / entry.name).symlink_to(entry)
    return overlay


def _formant_variant(variant: str, scale: float) -> Path:
    """The espeak-ng data folder in which variant ``variant`` has its formants 0-8 (espeak-ng's ``formant N freq%
    height% width%``) at ``scale`` times their frequency (to 1 %); the variant file is written on first use."""
    if not variant:
        raise ValueError("formant_scale needs a voice with an espeak-ng variant, '<language>+<variant>' ('en+m3')")
    percent = round(scale * 100)
    overlay = _formant_overlay(percent)
    with _VARIANT_LOCK:
        target = overlay / "voices" / "!v" / variant
        if not target.exists():
            lines = (_espeak_data() / "voices" / "!v" / variant).read_text(errors="replace").splitlines()
            formants = {int(line.split()[1]): line.split()[2:5] for line in lines if line.startswith("formant ")}
            kept = [line for line in lines if not line.startswith("formant ")]
            scaled = []
            for k in range(9):
                frequency, height, width = formants.get(k, ("100", "100", "100"))
                scaled.append(f"formant {k} {round(int(frequency) * percent / 100)} {height} {width}")
            target.write_text("\n".join([*kept, *scaled]) + "\n")
    return overlay


def synthesize(
    text: str, voice: str, rate: int, ssml: bool = False, pitch: int | None = None, formant_scale: float | None = None
) -> tuple[np.ndarray, int]:
    """Speak ``text`` with espeak-ng voice ``voice`` (e.g. ``"en+m3"``) at ``rate`` words per minute; with ``ssml``,
    ``text`` is SSML markup (espeak-ng ``-m``); ``pitch`` (0-99) moves the voice's base pitch (default: its own);
    ``formant_scale`` scales the variant's formant frequencies (a variant file written for it).

    Returns:
        ``(waveform, sampling_rate)``: float32 mono samples in [-1, 1], shape ``[num_samples]``, and espeak-ng's
        native rate (22050 Hz).
    """
    path = []
    if formant_scale is not None:
        path = [f"--path={_formant_variant(voice.partition('+')[2], formant_scale)}"]
    cmd = [_espeak_binary(), *path, *(["-m"] if ssml else []), "-v", voice, "-s", str(int(rate))]
    cmd += [*(["-p", str(int(pitch))] if pitch is not None else []), "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"espeak-ng failed ({' '.join(cmd)}): {proc.stderr.decode(errors='replace').strip()}")
    samples, sr = read_audio(proc.stdout)
    return downmix(samples), int(sr)


def _trim(wave: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    loud = np.flatnonzero(np.abs(wave) > threshold * max(float(np.abs(wave).max()), 1e-8))
    return wave[loud[0] : loud[-1] + 1] if loud.size else wave


def _finish(wave: np.ndarray, sr: int, rng: np.random.Generator, noise: tuple[float, float]) -> np.ndarray:
    """Pad with 50-250 ms of silence each side, normalise the peak to 0.3-0.9, add white noise."""
    lead, tail = (int(rng.uniform(0.05, 0.25) * sr) for _ in range(2))
    wave = np.concatenate([np.zeros(lead, np.float32), wave.astype(np.float32), np.zeros(tail, np.float32)])
    wave *= rng.uniform(0.3, 0.9) / max(float(np.abs(wave).max()), 1e-8)
    wave += rng.normal(0.0, rng.uniform(*noise), size=wave.shape).astype(np.float32)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def make_speech(
    text: str, voice: str, rate: int, sampling_rate: int, rng: np.random.Generator, ssml: bool = False,
    pitch: int | None = None, formant_scale: float | None = None,
) -> np.ndarray:
    """A speech clip: espeak-ng, silences trimmed, resampled to ``sampling_rate``, padded, peak-normalised, noisy.

    Returns:
        float32 samples, shape ``[num_samples]``.
    """
    wave, sr = synthesize(text, voice, rate, ssml=ssml, pitch=pitch, formant_scale=formant_scale)
    wave = _trim(wave)
    wave = resample(wave, sr, sampling_rate)
    return _finish(wave, sampling_rate, rng, noise=(0.0005, 0.003))


def make_beeps(
    num_beeps: int, frequency: float, sampling_rate: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``num_beeps`` sine beeps around ``frequency`` Hz (+-3 % per beep) in white noise.

    Each beep lasts 80-200 ms with 10 ms raised-cosine edges; gaps are 120-350 ms; 100-400 ms of noise lead and
    trail. Amplitudes 0.3-0.8, noise standard deviation 0.003-0.02.

    Returns:
        ``(waveform, spans)``: float32 samples of shape ``[num_samples]`` and the ``(start, end)`` sample index of
        each beep.
    """
    sr = sampling_rate
    pieces, spans, pos = [], [], 0

    def silence(seconds: float):
        nonlocal pos
        n = int(seconds * sr)
        pieces.append(np.zeros(n, np.float32))
        pos += n

    silence(rng.uniform(0.1, 0.4))
    for i in range(num_beeps):
        if i:
            silence(rng.uniform(0.12, 0.35))
        n = int(rng.uniform(0.08, 0.2) * sr)
        t = np.arange(n) / sr
        hz = frequency * rng.uniform(0.97, 1.03)
        tone = np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi)) * rng.uniform(0.3, 0.8)
        edge = min(int(0.01 * sr), n // 2)
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(edge) / edge)
        tone[:edge] *= ramp
        tone[n - edge :] *= ramp[::-1]
        pieces.append(tone.astype(np.float32))
        spans.append((pos, pos + n))
        pos += n
    silence(rng.uniform(0.1, 0.4))
    wave = np.concatenate(pieces)
    wave += rng.normal(0.0, rng.uniform(0.003, 0.02), size=wave.shape).astype(np.float32)
    return np.clip(wave, -1.0, 1.0).astype(np.float32), spans


def to_wav_bytes(wave: np.ndarray, sampling_rate: int, subtype: str = "PCM_16") -> bytes:
    """The bytes of a wav file of a mono float waveform: 16-bit PCM, or `subtype="FLOAT"` (32-bit float, lossless).
    The tooling's one wav writer (datasets, published examples, serving requests)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(wave, dtype=np.float32), sampling_rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def load_audio(example_audio: Any) -> tuple[np.ndarray, int]:
    """Read one cell of a ``datasets`` Audio column, decoded or not, at its own rate.

    Accepted forms: ``{"array": ..., "sampling_rate": ...}`` (decoded); ``{"bytes": ..., "path": ...}``
    (``Audio(decode=False)``; the bytes are read from memory, or the file at ``path`` when ``bytes`` is None);
    a torchcodec ``AudioDecoder`` (what ``datasets`` >= 4 decodes to). Reading and downmixing are the model's own
    (:func:`feature_extraction_mowe.read_audio` and :func:`~feature_extraction_mowe.downmix`).

    Returns:
        ``(waveform, sampling_rate)``: float32 mono samples of shape ``[num_samples]`` (channels are averaged) and
        the rate in Hz.

    Raises:
        ValueError: for anything else, or a cell with neither bytes nor path.
    """
    is_cell = hasattr(example_audio, "get_all_samples") or (
        isinstance(example_audio, Mapping)
        and (
            example_audio.get("array") is not None
            and example_audio.get("sampling_rate") is not None
            or example_audio.get("bytes") is not None
            or example_audio.get("path") is not None
        )
    )
    if not is_cell:
        raise ValueError(
            "Expected a datasets Audio cell: {'array', 'sampling_rate'} (decoded), {'bytes', 'path'} "
            f"(Audio(decode=False)) or an AudioDecoder; got {type(example_audio).__name__}: {example_audio!r:.100}"
        )
    samples, rate = read_audio(dict(example_audio) if isinstance(example_audio, Mapping) else example_audio)
    return downmix(samples), int(rate)


# ---------------------------------------------------------------------------------------------- row specs


def sentence_pool(sentence: str) -> str:
    """The split (``"train"``, ``"validation"`` or ``"test"``) that owns ``sentence``: a stable hash, 70/10/20 %."""
    bucket = int(hashlib.sha1(sentence.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 70 else "validation" if bucket < 80 else "test"


def _asr_sentence(rng: np.random.Generator) -> str:
    def pick(kind: str) -> str:
        return ASR_WORDS[kind][rng.integers(len(ASR_WORDS[kind]))]

    if rng.random() < 0.4:
        words = [pick("det")] + ([pick("adj")] if rng.random() < 0.5 else []) + [pick("agent"), pick("vi")]
        words += [pick("adv")] if rng.random() < 0.5 else []
    else:
        adjective_on = rng.integers(3)  # 0: none, 1: subject, 2: object; keeps 5-6 words
        words = [pick("det")] + ([pick("adj")] if adjective_on == 1 else []) + [pick("agent"), pick("vt")]
        words += [pick("det")] + ([pick("adj")] if adjective_on == 2 else []) + [pick("thing")]
    return " ".join(words)


def _language_sentence(language: str, rng: np.random.Generator) -> str:
    p = LANGUAGE_PHRASES[language]
    words = [p[k][rng.integers(len(p[k]))] for k in ("subj", "verb", "obj")]
    if rng.random() < 0.3:
        words.append(p["adv"][rng.integers(len(p["adv"]))])
    return " ".join(words)


def _draw_sentence(make, split: str, rng: np.random.Generator) -> str:
    while True:
        sentence = make(rng)
        if sentence_pool(sentence) == split:
            return sentence


def prosody_markup(sentence: str, prosody: Mapping[str, int]) -> str:
    """SSML that speaks ``sentence`` with ``<prosody>`` changes in percent (keys ``pitch``, ``range``, ``rate``,
    ``volume``)."""
    attributes = " ".join(f'{key}="{value:+d}%"' for key, value in prosody.items())
    return f"<speak><prosody {attributes}>{sentence}</prosody></speak>"


def _voice_group(split: str) -> str:
    return split if split in ("test", "far") else "train"


def _sentence_pool_of(split: str) -> str:
    return "validation" if split == "far" else split


def _draw_rate(low: int, high: int, split: str, rng: np.random.Generator) -> int:
    parity = {"test": [1], "far": [0, 1]}.get(split, [0])
    values = [v for v in range(low, high + 1) if v % 2 in parity]
    return int(values[rng.integers(len(values))])


def _balanced_labels(labels: tuple[str, ...], n: int, rng: np.random.Generator) -> list[str]:
    out = [labels[i % len(labels)] for i in range(n)]
    return [out[i] for i in rng.permutation(n)]


def _row_specs(config: BenchmarkConfig, split: str, task: str) -> list[dict[str, Any]]:
    """Every random choice of the rows of one (split, task), except the per-row rendering noise."""
    rng = np.random.default_rng([config.seed, _SPLIT_INDEX[split], _TASK_INDEX[task]])
    n = config.num_rows(split)
    group = _voice_group(split)
    voices = VOICE_VARIANTS[group]
    all_voices = voices["male"] + voices["female"]
    labels = TASK_LABELS[task]
    if task == "language":
        labels = config.languages
    answers = _balanced_labels(labels, n, rng) if labels else [None] * n
    pitch_range, pitch_rng = None, rng
    if split == "far":
        pitch_range = FAR_PITCH_RANGE  # drawn from the split's own stream
    elif group == "train" and config.train_pitch_range is not None:
        pitch_range = config.train_pitch_range
        pitch_rng = np.random.default_rng([config.seed, _SPLIT_INDEX[split], _TASK_INDEX[task], _PITCH_STREAM])
    formant_range = config.train_formant_range if group == "train" else None
    formant_rng = np.random.default_rng([config.seed, _SPLIT_INDEX[split], _TASK_INDEX[task], _FORMANT_STREAM])
    specs = []
    for i, answer in enumerate(answers):
        spec = {
            "id": f"{split}-{task}-{i:05d}",
            "task": task,
            "voice": "",
            "language": "",
            "rate": -1,
            "sentence": "",
            "num_beeps": -1,
            "beep_hz": -1.0,
            "ssml": "",
            "pitch": -1,
            "render_seed": [config.seed, _SPLIT_INDEX[split], _TASK_INDEX[task], i],
        }
        if task == "count":
            bands = BEEP_BANDS[group]
            low, high = bands[rng.integers(len(bands))]
            spec.update(num_beeps=COUNT_WORDS.index(answer) + 1, beep_hz=round(float(rng.uniform(low, high)), 1))
        else:
            language = answer if task == "language" else "english"
            if task == "gender":
                pool = voices[answer]
            else:
                pool = all_voices
            variant = pool[rng.integers(len(pool))]
            if task == "same_speaker":  # a second voice of the same gender, or the same one
                same_gender = voices["male" if variant in voices["male"] else "female"]
                others = [v for v in same_gender if v != variant]
                second = variant if answer == "same" else others[rng.integers(len(others))]
            if task == "rate":
                rate = _draw_rate(*(FAR_RATE_RANGES if split == "far" else RATE_RANGES)[answer], split, rng)
            else:
                rate = _draw_rate(*NEUTRAL_RATE_RANGE, split, rng)
            make = functools.partial(_language_sentence, language) if task == "language" else _asr_sentence
            sentence = _draw_sentence(make, _sentence_pool_of(split), rng)
            voice = f"{ESPEAK_LANGUAGE[language]}+{variant}"
            if task == "same_speaker":
                sentence += SENTENCE_SEPARATOR + _draw_sentence(make, _sentence_pool_of(split), rng)
                voice += f",{ESPEAK_LANGUAGE[language]}+{second}"
            spec.update(voice=voice, language=language, rate=rate, sentence=sentence)
            if task == "asr":
                answer = sentence
            if task == "emotion":
                jitter = rng.integers(-EMOTION_JITTER, EMOTION_JITTER + 1, size=len(EMOTION_PROSODY[answer]))
                profile = {k: int(v + j) for (k, v), j in zip(EMOTION_PROSODY[answer].items(), jitter)}
                spec["ssml"] = prosody_markup(sentence, profile)
            if pitch_range is not None:
                spec["pitch"] = int(pitch_rng.integers(pitch_range[0], pitch_range[1] + 1))
            if formant_range is not None:  # kept out of the row's columns, so every draw keeps one schema
                spec["formant_scale"] = round(float(formant_rng.uniform(*formant_range)), 2)
        spec["answer"] = answer
        specs.append(spec)
    return specs


def _make_row(spec: dict[str, Any], sampling_rate: int) -> dict[str, Any]:
    """The finished row of one spec: audio bytes, prompt, chat messages and metadata."""
    rng = np.random.default_rng(spec["render_seed"])
    if spec["task"] == "count":
        wave, _ = make_beeps(spec["num_beeps"], spec["beep_hz"], sampling_rate, rng)
    else:
        pitch = spec["pitch"] if spec["pitch"] >= 0 else None
        formant_scale = spec.get("formant_scale")
        texts = [spec["ssml"]] if spec["ssml"] else spec["sentence"].split(SENTENCE_SEPARATOR)
        voices = spec["voice"].split(",")  # same_speaker: one sentence per voice, one after the other
        wave = np.concatenate([
            make_speech(text, voice, spec["rate"], sampling_rate, rng, ssml=bool(spec["ssml"]), pitch=pitch,
                        formant_scale=formant_scale)
            for text, voice in zip(texts, voices, strict=True)
        ])
    prompt = TASK_PROMPTS[spec["task"]]
    row = {k: v for k, v in spec.items() if k not in ("render_seed", "ssml", "formant_scale")}
    row.update(
        audio={"bytes": to_wav_bytes(wave, sampling_rate), "path": f"{spec['id']}.wav"},
        prompt=prompt,
        messages=chat_messages(prompt, spec["answer"]),
        duration=round(len(wave) / sampling_rate, 3),
    )
    return row


def chat_messages(prompt: str, answer: str | None = None) -> list[dict[str, Any]]:
    """The chat form of one example: a user turn (audio, then the prompt) and, when given, the assistant's answer.

    Stored in a dataset, the audio part reads back as ``{"type": "audio", "text": None}`` (Arrow structs share keys).
    """
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def benchmark_features(sampling_rate: int = SAMPLING_RATE):
    """The :class:`datasets.Features` of every split (the audio column is not decoded; see :func:`load_audio`)."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features(
        {
            "id": text,
            "audio": datasets.Audio(sampling_rate=sampling_rate, decode=False),
            "task": text,
            "prompt": text,
            "answer": text,
            "messages": datasets.List(
                {"role": text, "content": datasets.List({"type": text, "text": datasets.Value("string")})}
            ),
            "voice": text,
            "language": text,
            "rate": datasets.Value("int32"),
            "pitch": datasets.Value("int32"),
            "sentence": text,
            "num_beeps": datasets.Value("int32"),
            "beep_hz": datasets.Value("float32"),
            "duration": datasets.Value("float32"),
        }
    )


def generate_rows(
    config: BenchmarkConfig | None = None, num_proc: int | None = None, progress: bool = True
) -> dict[str, list[dict[str, Any]]]:
    """Synthesise every row, in memory: ``{split: [row, ...]}``, rows ordered by task then index.

    espeak-ng runs in a thread pool of ``num_proc`` workers (default: the CPU count); the output does not depend on
    the number of workers.
    """
    from tqdm.auto import tqdm

    config = config or BenchmarkConfig()
    specs = {split: [s for task in config.tasks for s in _row_specs(config, split, task)] for split in config.splits}
    total = sum(len(v) for v in specs.values())
    workers = max(1, num_proc or os.cpu_count() or 1)
    rows: dict[str, list[dict[str, Any]]] = {}
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=total, desc="Synthesising MoWE benchmark", unit="clip", disable=not progress) as bar,
    ):
        for split in config.splits:
            rows[split] = []
            for row in pool.map(functools.partial(_make_row, sampling_rate=config.sampling_rate), specs[split]):
                rows[split].append(row)
                bar.update(1)
    return rows


def build_benchmark(
    cache_dir: str | os.PathLike,
    config: BenchmarkConfig | None = None,
    num_proc: int | None = None,
    progress: bool = True,
):
    """The benchmark as a :class:`datasets.DatasetDict` with splits ``train``, ``validation`` and ``test``.

    Built once and cached with ``save_to_disk`` under ``cache_dir/<config.fingerprint()>/``; a later call with the
    same settings loads it (``load_from_disk``), any changed setting builds a new one. The build is deterministic:
    the same config gives the same audio bytes.

    Columns: ``id``, ``audio`` (``Audio(decode=False)``: ``{"bytes": <16-bit wav>, "path": "<id>.wav"}``, mono, at
    ``config.sampling_rate``; read with :func:`load_audio`, or ``cast_column("audio", Audio())`` where decoding
    works), ``task``, ``prompt``, ``answer``, ``messages`` (user: audio + prompt; assistant: answer), and metadata:
    ``voice`` (espeak-ng voice, ``""`` for beeps), ``language`` (``""`` for beeps), ``rate`` (wpm, -1 for beeps),
    ``sentence`` (``""`` for beeps), ``num_beeps`` and ``beep_hz`` (-1 for speech), ``duration`` (seconds).
    """
    import datasets

    config = config or BenchmarkConfig()
    target = Path(cache_dir) / config.fingerprint()
    marker = target / "benchmark_config.json"
    if marker.is_file():
        return datasets.load_from_disk(str(target))
    rows = generate_rows(config, num_proc=num_proc, progress=progress)
    silence = (
        not progress
        and datasets.is_progress_bar_enabled()
        and os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") is None
    )
    if silence:
        datasets.disable_progress_bars()
    try:
        return _assemble_and_save(rows, config, target)
    finally:
        if silence:
            datasets.enable_progress_bars()


def _assemble_and_save(rows: dict[str, list[dict[str, Any]]], config: BenchmarkConfig, target: Path):
    import datasets

    marker = target / "benchmark_config.json"
    features = benchmark_features(config.sampling_rate)
    # datasets' Audio.encode_example needs torchcodec even for wav bytes; a plain struct cast to Audio does not.
    raw_features = datasets.Features(features)
    raw_features["audio"] = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}

    def as_dataset(split_rows: list[dict[str, Any]]) -> datasets.Dataset:
        if not split_rows:  # datasets cannot cast an empty table; with no rows there is nothing to cast
            return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
        columns = {name: [row[name] for row in split_rows] for name in features}
        return datasets.Dataset.from_dict(columns, features=raw_features).cast(features)

    dataset = datasets.DatasetDict({split: as_dataset(rows[split]) for split in config.splits})
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # One shard per split, written even for an empty split (datasets' default writes none and cannot reload it).
        dataset.save_to_disk(str(staging), num_shards={split: 1 for split in config.splits})
        (staging / "benchmark_config.json").write_text(
            json.dumps({"config": config.to_dict(), "fingerprint": target.name, "generator": GENERATOR_VERSION})
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError:
        if not marker.is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return datasets.load_from_disk(str(target))


def split_overlap(dataset_dict) -> dict[str, dict[str, list]]:
    """What ``validation``, ``test`` and ``far`` share with ``train`` (``far``: with train or test), per held-out
    property.

    Returns:
        ``{"validation": {...}, "test": {...}, "far": {...}}`` (the splits present), each with sorted lists:
        ``sentences`` (any task's sentences also in train), ``gender_voices`` (voice variants of the gender task also
        in train), ``voices`` (any speech voice variant also in train), ``rates`` (rate-task wpm values also in
        train), ``beep_hz_bands`` (beep frequencies inside a training band). Everything is empty for ``test`` and
        ``far`` on a correct build; ``validation`` shares voices, rates and bands with train by design but no
        sentences.
    """

    def variants(ds, task=None):
        return {part.split("+", 1)[1] for v, t in zip(ds["voice"], ds["task"]) if v and (task is None or t == task)
                for part in v.split(",")}

    def sentences(ds):
        return {part for s in ds["sentence"] if s for part in s.split(SENTENCE_SEPARATOR)}

    def rates(ds):
        return {r for r, t in zip(ds["rate"], ds["task"]) if t == "rate"}

    report = {}
    for split in ("validation", "test", "far"):
        if split not in dataset_dict:
            continue
        ds = dataset_dict[split]
        seen = [dataset_dict["train"]] + ([dataset_dict["test"]] if split == "far" and "test" in dataset_dict else [])
        bands = [band for group in ("train", "test")[: len(seen)] for band in BEEP_BANDS[group]]
        hz = [h for h, t in zip(ds["beep_hz"], ds["task"]) if t == "count"]
        report[split] = {
            "sentences": sorted(sentences(ds) & set().union(*map(sentences, seen))),
            "gender_voices": sorted(variants(ds, "gender") & set().union(*[variants(d, "gender") for d in seen])),
            "voices": sorted(variants(ds) & set().union(*map(variants, seen))),
            "rates": sorted(rates(ds) & set().union(*map(rates, seen))),
            "beep_hz_bands": sorted({round(h, 1) for h in hz if any(lo <= h <= hi for lo, hi in bands)}),
        }
    return report

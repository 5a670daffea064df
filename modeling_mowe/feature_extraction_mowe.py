"""MoWEFeatureExtractor: every front-end the encoders need, each computed once per clip and shared."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from transformers import BatchFeature, Wav2Vec2FeatureExtractor, WhisperFeatureExtractor
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor

from .encoders import SAMPLING_RATE, WHISPER_CHUNK_SECONDS, audio_front_ends, frame_spec, min_samples

PCM_SCALES = {np.dtype("int8"): 2**7, np.dtype("int16"): 2**15, np.dtype("int32"): 2**31}


def _read_audio_file(source: str | os.PathLike | bytes) -> tuple[np.ndarray, int]:
    try:
        import soundfile
    except ImportError as err:
        raise ImportError("Reading audio files needs `soundfile`: pip install soundfile") from err
    try:
        data, rate = soundfile.read(io.BytesIO(source) if isinstance(source, bytes) else source, always_2d=False)
    except Exception as err:  # soundfile raises several types for unreadable input
        name = "audio bytes" if isinstance(source, bytes) else f"file {os.fspath(source)!r}"
        raise ValueError(f"Could not read {name} as audio ({err}); give a wav/flac/ogg file or an array.") from err
    return data, rate


def _resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    try:
        import soxr
    except ImportError as err:
        raise ImportError(f"Resampling {rate} Hz audio to {target} Hz needs `soxr`: pip install soxr") from err
    return soxr.resample(wave, rate, target, quality="HQ").astype(np.float32)


def _is_single_clip(audio: Any) -> bool:
    if isinstance(audio, (str, os.PathLike, bytes, dict)):
        return True
    if hasattr(audio, "ndim") and hasattr(audio, "shape"):  # numpy arrays and torch tensors
        return audio.ndim <= 2
    if isinstance(audio, (list, tuple)):
        return len(audio) > 0 and all(isinstance(x, (int, float, np.number)) for x in audio)
    return True  # not a batch: `to_mono_waveform` says what is wrong with it


def to_mono_waveform(audio: Any, sampling_rate: int | None, target_rate: int = SAMPLING_RATE) -> np.ndarray:
    """One clip in any form users hand in -> float32 mono waveform at `target_rate` [num_samples].

    Accepts float/int-PCM numpy arrays, python lists, torch tensors, mono or multi-channel in either axis order
    (averaged to mono), file paths or bytes (via soundfile), and `datasets` Audio cells (`{"array",
    "sampling_rate"}` or `{"bytes", "path"}`). Raw arrays need `sampling_rate`; files carry their own.
    Raises `ValueError` (or `TypeError` for non-audio objects) naming the problem and the fix.
    """
    rate = sampling_rate
    if isinstance(audio, dict):
        if audio.get("array") is not None:
            audio, rate = audio["array"], audio.get("sampling_rate", sampling_rate)
        elif audio.get("bytes") is not None or audio.get("path") is not None:
            audio, rate = _read_audio_file(audio["bytes"] if audio.get("bytes") is not None else audio["path"])
        else:
            raise ValueError(
                f"An audio dict needs 'array' + 'sampling_rate' or 'bytes'/'path'; got keys {sorted(audio)}."
            )
    elif isinstance(audio, (str, os.PathLike, bytes)):
        audio, rate = _read_audio_file(audio)

    if hasattr(audio, "detach") and hasattr(audio, "cpu"):  # torch tensor
        audio = audio.detach().cpu()
        audio = audio.float().numpy() if audio.is_floating_point() else audio.numpy()
    if isinstance(audio, (list, tuple)):
        try:
            audio = np.asarray(audio, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError("A list given as audio must hold numbers (one clip) or clips (a batch).") from err
    if not isinstance(audio, np.ndarray):
        raise TypeError(
            f"Expected audio as a numpy array, list, torch tensor, file path or datasets Audio dict, "
            f"got {type(audio).__name__}."
        )

    if audio.dtype in PCM_SCALES:
        audio = audio.astype(np.float32) / PCM_SCALES[audio.dtype]
    elif audio.dtype == np.uint8:
        audio = (audio.astype(np.float32) - 128) / 128
    elif audio.dtype.kind != "f":
        raise TypeError(f"Audio arrays must hold float or integer PCM samples, got dtype {audio.dtype}.")

    if audio.ndim == 0 or audio.ndim > 2:
        raise ValueError(
            f"An audio clip must be 1-D (mono) or 2-D (channels x samples, either order); got shape {audio.shape}. "
            "For a batch, pass a list of clips."
        )
    if audio.ndim == 2:
        channel_axis = int(np.argmin(audio.shape))
        if audio.shape[channel_axis] > 8:
            raise ValueError(
                f"A 2-D audio array of shape {audio.shape} is ambiguous: expected (channels, samples) with at most "
                "8 channels. For a batch of clips, pass a list of 1-D arrays."
            )
        audio = audio.mean(axis=channel_axis)
    if audio.size == 0:
        raise ValueError("Empty audio clip (0 samples); remove it or give at least a few milliseconds of audio.")
    if not np.isfinite(audio).all():
        bad = int((~np.isfinite(audio)).sum())
        raise ValueError(f"Audio clip has {bad} NaN/Inf samples; clean the signal (e.g. np.nan_to_num) first.")

    if rate is None:
        raise ValueError(
            "A raw audio array was given without its sampling rate; pass `sampling_rate=` (e.g. 16000) so it can be "
            f"resampled to {target_rate} Hz. Silent guessing would give wrong features."
        )
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) or rate <= 0:
        raise ValueError(f"sampling_rate must be a positive number, got {rate!r}.")
    audio = audio.astype(np.float32)
    if int(rate) != target_rate:
        audio = _resample(audio, int(rate), target_rate)
    return audio


def to_mono_waveforms(audio: Any, sampling_rate: int | None, target_rate: int = SAMPLING_RATE) -> list[np.ndarray]:
    """A clip or a batch of clips (see `to_mono_waveform`) -> list of float32 mono waveforms at `target_rate`."""
    if _is_single_clip(audio):
        return [to_mono_waveform(audio, sampling_rate, target_rate)]
    clips = list(audio)
    if not clips:
        raise ValueError("An empty list of audio clips was given.")
    out = []
    for i, clip in enumerate(clips):
        try:
            out.append(to_mono_waveform(clip, sampling_rate, target_rate))
        except (TypeError, ValueError) as err:
            raise type(err)(f"Audio clip {i}: {err}") from err
    return out


class MoWEFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Computes every distinct front-end of a MoWE model's encoders once per clip: one log-mel spectrogram per
    distinct mel size (through `WhisperFeatureExtractor`; Whisper-large-v3 + 4 x Whisper-tiny compute 2, not 5)
    and, if a waveform encoder is present, the normalised waveform (through `Wav2Vec2FeatureExtractor`).

    Clips longer than `chunk_length` seconds are split into windows that the model encodes in order; clips (or last
    windows) shorter than `min_samples` are zero-padded to it.

    Returns a `BatchFeature` with, per window:
        - `input_features` `(num_windows, sum of distinct n_mels, chunk_length * 100)`: log-mels stacked on channels;
        - `input_values` `(num_windows, longest window)`: zero-mean unit-variance waveform, zero-padded;
        - `audio_lengths` `(num_windows,)`: real samples per window.
    """

    model_input_names = ["input_features", "input_values", "audio_lengths"]

    def __init__(
        self,
        front_ends: list[dict] | None = None,
        sampling_rate: int = SAMPLING_RATE,
        chunk_length: int = WHISPER_CHUNK_SECONDS,
        min_samples: int = 400,
        padding_value: float = 0.0,
        **kwargs,
    ):
        front_ends = front_ends if front_ends is not None else [{"kind": "log_mel", "n_mels": 128}]
        feature_size = sum(f["n_mels"] for f in front_ends if f["kind"] == "log_mel") or 1
        kwargs.pop("feature_size", None)
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs)
        self.front_ends = front_ends
        self.chunk_length = chunk_length
        self.min_samples = min_samples
        self._mel_extractors = {
            f["n_mels"]: WhisperFeatureExtractor(
                feature_size=f["n_mels"], sampling_rate=sampling_rate, chunk_length=chunk_length
            )
            for f in front_ends
            if f["kind"] == "log_mel"
        }
        self._waveform_extractor = (
            Wav2Vec2FeatureExtractor(sampling_rate=sampling_rate, do_normalize=True, return_attention_mask=True)
            if any(f["kind"] == "waveform" for f in front_ends)
            else None
        )

    @classmethod
    def from_mowe_config(cls, config, **kwargs) -> MoWEFeatureExtractor:
        """The feature extractor a `MoWEConfig`'s encoders need."""
        encoders = config.encoder_configs if config.router_type != "none" else [config.base_encoder_config]
        return cls(
            front_ends=audio_front_ends(encoders),
            min_samples=max(min_samples(frame_spec(c)) for c in encoders),
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("_mel_extractors", None)
        output.pop("_waveform_extractor", None)
        return output

    def fetch_audio(self, audio: Any, **kwargs) -> Any:
        # Paths stay paths: `to_mono_waveform` reads them with their own sampling rate.
        return audio

    def window_lengths(self, num_samples: int) -> list[int]:
        """Lengths (samples) of the windows a clip of `num_samples` is encoded in."""
        window = self.chunk_length * self.sampling_rate
        lengths = [min(window, num_samples - start) for start in range(0, num_samples, window)]
        return [max(length, self.min_samples) for length in lengths]

    def __call__(
        self,
        raw_speech: Any,
        sampling_rate: int | None = None,
        return_tensors: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Features for one clip or a batch of clips (any form `to_mono_waveforms` accepts)."""
        clips = to_mono_waveforms(raw_speech, sampling_rate, self.sampling_rate)
        window = self.chunk_length * self.sampling_rate
        windows = []
        for clip in clips:
            for start in range(0, len(clip), window):
                piece = clip[start : start + window]
                if len(piece) < self.min_samples:
                    piece = np.pad(piece, (0, self.min_samples - len(piece)))
                windows.append(piece)

        data: dict[str, Any] = {}
        if self._mel_extractors:
            mels = [
                extractor(windows, sampling_rate=self.sampling_rate, padding="max_length", return_tensors="np")[
                    "input_features"
                ]
                for extractor in self._mel_extractors.values()
            ]
            data["input_features"] = np.concatenate(mels, axis=1).astype(np.float32)
        if self._waveform_extractor is not None:
            data["input_values"] = self._waveform_extractor(
                windows, sampling_rate=self.sampling_rate, padding="longest", return_tensors="np"
            )["input_values"].astype(np.float32)
        data["audio_lengths"] = np.array([len(w) for w in windows], dtype=np.int64)
        return BatchFeature(data, tensor_type=return_tensors)


__all__ = ["MoWEFeatureExtractor", "to_mono_waveform", "to_mono_waveforms"]

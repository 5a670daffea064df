"""MoWEFeatureExtractor: every front-end the encoders need, each computed once per clip and shared."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature, Wav2Vec2FeatureExtractor, WhisperFeatureExtractor
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor

from .encoders import SAMPLING_RATE, WHISPER_CHUNK_SECONDS, WhisperFrameSpec, frame_spec

PCM_SCALES = {np.dtype("int8"): 2**7, np.dtype("int16"): 2**15, np.dtype("int32"): 2**31}
MAX_CHANNELS = 8
# RIFF sizes from here up are placeholders of writers that stream (espeak-ng writes 0x7FFFF024), not real sizes.
STREAMING_WAV_SIZE = 0x7FFF0000


def _read_audio_file(source: str | os.PathLike | bytes) -> tuple[np.ndarray, int]:
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ValueError(f"Audio URLs are not fetched ({source!r}); download the file and pass its path or an array.")
    if not isinstance(source, bytes):
        if os.path.isdir(source):
            raise ValueError(
                f"Audio path {os.fspath(source)!r} is a directory, not an audio file; pass the path of one "
                "wav/flac/ogg file (or list the files in the directory and pass them as a list of clips)."
            )
        if not os.path.isfile(source):
            raise ValueError(
                f"Audio file {os.fspath(source)!r} does not exist; pass an existing wav/flac/ogg path, or an array "
                "with its sampling_rate."
            )
    _check_wav_complete(source)
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


def _check_wav_complete(source: str | os.PathLike | bytes) -> None:
    """Raise a `ValueError` for a WAV file shorter than its RIFF header says (a cut-off download or copy), which
    soundfile would read silently as the few samples that are there. Streaming writers (espeak-ng, ffmpeg to a pipe)
    cannot know the size and write a placeholder (0, 0xFFFFFFFF, espeak-ng's 0x7FFFF024): those are let through."""
    if isinstance(source, bytes):
        header, size = source[:12], len(source)
    else:
        with open(source, "rb") as file:
            header = file.read(12)
        size = os.path.getsize(source)
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return
    declared = int.from_bytes(header[4:8], "little") + 8
    if 8 < declared < STREAMING_WAV_SIZE and size < declared:
        name = "The WAV bytes" if isinstance(source, bytes) else f"WAV file {os.fspath(source)!r}"
        raise ValueError(
            f"{name} end after {size} of the {declared} bytes the header declares: the file is cut off. "
            "Re-export or re-download it."
        )


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """A float mono waveform at `rate` Hz -> float32 at `target` Hz (soxr, high quality); unchanged if equal."""
    if int(rate) == target:
        return wave.astype(np.float32)
    try:
        import soxr
    except ImportError as err:
        raise ImportError(f"Resampling {rate} Hz audio to {target} Hz needs `soxr`: pip install soxr") from err
    return soxr.resample(wave, int(rate), target, quality="HQ").astype(np.float32)


def _is_single_clip(audio: Any) -> bool:
    if isinstance(audio, (str, os.PathLike, bytes, dict)):
        return True
    if hasattr(audio, "ndim") and hasattr(audio, "shape"):  # an array is one clip; batches are lists of clips
        return True
    if isinstance(audio, (list, tuple)):
        return len(audio) > 0 and all(isinstance(x, (int, float, np.number)) for x in audio)
    return True  # not a batch: `to_mono_waveform` says what is wrong with it


def read_audio(audio: Any, sampling_rate: int | None = None) -> tuple[np.ndarray, int | None]:
    """One clip as users hand it in -> `(samples, rate)`: the samples as a numpy array of any dtype and 1-2 dims.

    Files and bytes (wav/flac/ogg via soundfile), `datasets` Audio cells (decoded `{"array", "sampling_rate"}`,
    undecoded `{"bytes", "path"}`) and torchcodec `AudioDecoder`s carry their own rate; arrays, lists and tensors
    take `sampling_rate` (which may be `None`: [`downmix`] and [`to_mono_waveform`] check it).
    """
    rate = sampling_rate
    if isinstance(audio, dict):
        if audio.get("array") is not None:
            audio, rate = audio["array"], audio.get("sampling_rate", sampling_rate)
        elif audio.get("bytes") is not None or audio.get("path") is not None:
            audio, rate = _read_audio_file(audio["bytes"] if audio.get("bytes") is not None else audio["path"])
        else:
            raise ValueError(
                "An audio dict needs 'array' + 'sampling_rate' (a decoded datasets Audio cell) or 'bytes'/'path' "
                f"(an undecoded one); got keys {sorted(audio)}."
            )
    elif isinstance(audio, (str, os.PathLike, bytes)):
        audio, rate = _read_audio_file(audio)
    elif hasattr(audio, "get_all_samples"):  # torchcodec AudioDecoder, as `datasets` decodes Audio columns
        samples = audio.get_all_samples()
        audio, rate = samples.data, samples.sample_rate

    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu()
        audio = audio.float().numpy() if audio.is_floating_point() else audio.numpy()
    if isinstance(audio, np.generic):
        audio = np.asarray(audio)
    if isinstance(audio, (list, tuple)):
        try:
            audio = np.asarray(audio, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(
                "A list given as audio must hold numbers (one clip) or clips (a batch) of equal nesting."
            ) from err
    if not isinstance(audio, np.ndarray):
        raise TypeError(
            "Expected audio as a numpy array, list of floats, torch tensor, file path, bytes or datasets Audio cell, "
            f"got {type(audio).__name__}; convert it to one of those."
        )
    return audio, rate


def downmix(audio: np.ndarray) -> np.ndarray:
    """Samples of one clip -> float32 mono `(num_samples,)`: integer PCM (int8/16/32, uint8) scaled to [-1, 1],
    channels averaged (`(channels, samples)` or `(samples, channels)`, at most `MAX_CHANNELS`); empty, 3-D and
    NaN/Inf clips raise `ValueError`."""
    if audio.dtype in PCM_SCALES:
        audio = audio.astype(np.float32) / PCM_SCALES[audio.dtype]
    elif audio.dtype == np.uint8:
        audio = (audio.astype(np.float32) - 128) / 128
    elif audio.dtype.kind != "f":
        raise TypeError(
            f"Audio arrays must hold float or integer PCM samples, got dtype {audio.dtype}; convert to float32."
        )
    if audio.ndim == 0 or audio.ndim > 2:
        raise ValueError(
            f"An audio clip must be 1-D (mono) or 2-D (channels x samples, either order); got shape {audio.shape}. "
            "For a batch, pass a list of clips."
        )
    if audio.size == 0:
        raise ValueError("Empty audio clip (0 samples); remove it or give at least a few milliseconds of audio.")
    if audio.ndim == 2:
        channel_axis = int(np.argmin(audio.shape))
        if audio.shape[channel_axis] > MAX_CHANNELS:
            raise ValueError(
                f"A 2-D audio array of shape {audio.shape} is ambiguous: expected (channels, samples) or (samples, "
                f"channels) with at most {MAX_CHANNELS} channels. For a batch of clips, pass a list of 1-D arrays."
            )
        audio = audio.mean(axis=channel_axis)
    if not np.isfinite(audio).all():
        bad = int((~np.isfinite(audio)).sum())
        raise ValueError(
            f"Audio clip has {bad} NaN/Inf samples; clean the signal first (e.g. np.nan_to_num(clip, posinf=0, "
            "neginf=0))."
        )
    return audio.astype(np.float32)


def _check_rate(rate: Any, target_rate: int) -> None:
    if rate is None:
        raise ValueError(
            "A raw audio array was given without its sampling rate; pass `sampling_rate=` (e.g. 16000) so it can be "
            f"resampled to {target_rate} Hz. Silent guessing would give wrong features."
        )
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) or not rate > 0:
        raise ValueError(
            f"sampling_rate must be a positive number of Hz, got {rate!r}; pass the rate the audio was recorded at "
            "(e.g. sampling_rate=16000)."
        )


def to_mono_waveform(audio: Any, sampling_rate: int | None, target_rate: int = SAMPLING_RATE) -> np.ndarray:
    """One clip in any form users hand in -> float32 mono waveform at `target_rate`, shape `(num_samples,)`.

    [`read_audio`] (files, bytes, `datasets` cells, decoders, arrays, lists, tensors), then [`downmix`] (integer
    PCM scaled, channels averaged, checks), then [`resample`]. Raw arrays need `sampling_rate`; files and decoders
    carry their own. Raises `ValueError` (`TypeError` for objects that are not audio) naming the problem and the fix.
    """
    samples, rate = read_audio(audio, sampling_rate)
    wave = downmix(samples)
    _check_rate(rate, target_rate)
    return resample(wave, rate, target_rate)


def to_mono_waveforms(audio: Any, sampling_rate: int | None, target_rate: int = SAMPLING_RATE) -> list[np.ndarray]:
    """A clip or a list of clips (any form `to_mono_waveform` accepts) -> list of float32 mono waveforms."""
    if _is_single_clip(audio):
        return [to_mono_waveform(audio, sampling_rate, target_rate)]
    clips = list(audio)
    if not clips:
        raise ValueError("An empty list of audio clips was given; pass at least one clip, or `audio=None`.")
    out = []
    for i, clip in enumerate(clips):
        try:
            out.append(to_mono_waveform(clip, sampling_rate, target_rate))
        except (TypeError, ValueError) as err:
            raise type(err)(f"Audio clip {i}: {err}") from err
    return out


class MoWEFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Computes the distinct front-ends of a MoWE model's encoders once per clip and shares them: log-mel spectrograms
    of each distinct size (Whisper's, with the filters of `WhisperFeatureExtractor(feature_size=n_mels)`) and, if a
    waveform encoder is present, the normalised waveform (`Wav2Vec2FeatureExtractor`). Whisper-large-v3 +
    4 x Whisper-tiny compute one power spectrogram and two mel projections, not five spectrograms.

    Clips are resampled to `sampling_rate` and downmixed to mono first (see [`to_mono_waveform`]). Clips longer than
    `chunk_length` seconds are split into windows that the model encodes in order; clips (or last windows) shorter
    than `min_samples` are zero-padded to it.

    Args:
        front_ends (`list[dict]`): `{"kind": "log_mel", "n_mels": n}` and/or `{"kind": "waveform"}`, in input order
            (`encoders.audio_front_ends`).
        sampling_rate (`int`, defaults to 16000): the rate every clip is resampled to.
        chunk_length (`int`, defaults to 30): window length in seconds (Whisper's input length).
        min_samples (`int`, defaults to 400): shortest window every encoder gives a frame for.
        log_mel_length (`str`, defaults to `"chunk"`): `"chunk"` gives every window's log-mels `chunk_length` s of
            frames, as Whisper reads them in padded mode; `"longest"` only the frames of the batch's longest window
            (rounded up to an even count) that a `dynamic_audio_length` model reads, with the same values on them.

    Returns a [`BatchFeature`] with one row per window:
        - `input_features` `(num_windows, sum of distinct n_mels, mel_frames)`: log-mels stacked on channels (if any
          encoder reads log-mels); `mel_frames` is `chunk_length * 100`, or with `log_mel_length="longest"` the
          longest window's;
        - `input_values` `(num_windows, longest window)`: zero-mean unit-variance waveforms, zero-padded (if any
          encoder reads the waveform);
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
        log_mel_length: str = "chunk",
        **kwargs,
    ):
        front_ends = front_ends if front_ends is not None else [{"kind": "log_mel", "n_mels": 128}]
        unknown = [f for f in front_ends if f.get("kind") not in ("log_mel", "waveform")]
        if unknown:
            raise ValueError(
                f"Unknown front-end(s) {unknown}; each must be kind 'log_mel' (with n_mels) or 'waveform'."
            )
        feature_size = sum(f["n_mels"] for f in front_ends if f["kind"] == "log_mel") or 1
        kwargs.pop("feature_size", None)
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs)
        self.front_ends = front_ends
        self.chunk_length = chunk_length
        self.min_samples = min_samples
        if log_mel_length not in ("chunk", "longest"):
            raise ValueError(f"log_mel_length must be 'chunk' or 'longest', got {log_mel_length!r}.")
        self.log_mel_length = log_mel_length
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
        """The feature extractor the encoders of a `MoWEConfig` need (only the base encoder's if `router_type="none"`);
        log-mels only as long as the batch's longest window when the model runs in `dynamic_audio_length` mode."""
        kwargs.setdefault("log_mel_length", "longest" if getattr(config, "dynamic_audio_length", False) else "chunk")
        return cls(
            front_ends=config.audio_front_ends,
            min_samples=max(frame_spec(c).min_samples for c in config.active_encoder_configs),
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        extractors = self._mel_extractors, self._waveform_extractor
        del self._mel_extractors, self._waveform_extractor
        try:
            return super().to_dict()
        finally:
            self._mel_extractors, self._waveform_extractor = extractors

    def fetch_audio(self, audio: Any, **kwargs) -> Any:
        """Identity: paths stay paths, read by [`to_mono_waveform`] at their own sampling rate."""
        return audio

    def window_lengths(self, num_samples: int) -> list[int]:
        """Lengths in samples of the windows a 16 kHz clip of `num_samples` is encoded in (after padding)."""
        window = self.chunk_length * self.sampling_rate
        lengths = [min(window, num_samples - start) for start in range(0, num_samples, window)]
        return [max(length, self.min_samples) for length in lengths]

    def split_windows(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """Mono clips -> their windows in order, each at most `chunk_length` s and at least `min_samples` long."""
        window = self.chunk_length * self.sampling_rate
        windows = []
        for clip in clips:
            for start in range(0, len(clip), window):
                piece = clip[start : start + window]
                if len(piece) < self.min_samples:
                    piece = np.pad(piece, (0, self.min_samples - len(piece)))
                windows.append(piece)
        return windows

    def power_spectrogram(self, windows: list[np.ndarray]) -> tuple[torch.Tensor, int]:
        """Whisper's STFT power of each window zero-padded to `chunk_length` s, computed once for every mel size.

        Returns `(power, num_frames)`: `power` `(num_windows, n_fft // 2 + 1, computed_frames)` holds the frames that
        can see any sample of the batch's longest window; every later frame of the `num_frames` is all zeros and is
        filled in by `log_mel`, exactly as the full-length computation gives it.
        """
        reference = next(iter(self._mel_extractors.values()))
        n_fft, hop = reference.n_fft, reference.hop_length
        n_samples = self.chunk_length * self.sampling_rate
        num_frames = n_samples // hop
        longest = max(len(w) for w in windows)
        computed = min(num_frames, -(-(longest + n_fft // 2) // hop))
        span = n_samples if computed == num_frames else computed * hop + n_fft // 2
        batch = np.zeros((len(windows), span), dtype=np.float32)
        for row, window in zip(batch, windows):
            row[: len(window)] = window
        stft = torch.stft(torch.from_numpy(batch), n_fft, hop, window=torch.hann_window(n_fft), return_complex=True)
        return stft[..., :computed].abs() ** 2, num_frames

    def mel_frames_read(self, longest_window: int) -> int:
        """Log-mel frames a `dynamic_audio_length` Whisper reads for a batch whose longest window has `longest_window`
        samples (`WhisperFrameSpec.mel_frames_read`, over `chunk_length` s windows)."""
        hop = next(iter(self._mel_extractors.values())).hop_length
        window_frames = self.chunk_length * self.sampling_rate // hop // 2
        return WhisperFrameSpec(max_frames=window_frames, hop_length=hop).mel_frames_read(longest_window)

    def log_mel(self, power: torch.Tensor, num_frames: int, n_mels: int, out: np.ndarray | None = None) -> np.ndarray:
        """Whisper's log-mel `(num_windows, n_mels, num_frames)` from `power_spectrogram`'s output (into `out`, which
        may keep only the first frames: their values are those of the full `num_frames`)."""
        filters = torch.from_numpy(self._mel_extractors[n_mels].mel_filters).to(torch.float32)
        log_spec = torch.clamp(filters.T @ power, min=1e-10).log10()
        floor = log_spec.amax(dim=(1, 2), keepdim=True) - 8.0
        computed = log_spec.shape[-1]
        if computed < num_frames:  # the frames not computed are silent: log10(1e-10) = -10
            floor = floor.clamp(min=-10.0)
        if out is None:
            out = np.empty((power.shape[0], n_mels, num_frames), dtype=np.float32)
        shown = min(computed, out.shape[-1])
        out[..., :shown] = ((torch.maximum(log_spec[..., :shown], floor) + 4.0) / 4.0).numpy()
        out[..., shown:] = ((floor + 4.0) / 4.0).numpy()
        return out

    def normalized_waveform(self, windows: list[np.ndarray]) -> np.ndarray:
        """Zero-mean unit-variance windows (statistics over each window's real samples), zero-padded to the longest."""
        return self._waveform_extractor(
            windows, sampling_rate=self.sampling_rate, padding="longest", return_tensors="np"
        )["input_values"].astype(np.float32)

    def __call__(
        self,
        raw_speech: Any,
        sampling_rate: int | None = None,
        return_tensors: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Features of one clip or a list of clips (any form [`to_mono_waveform`] accepts).

        Args:
            raw_speech: a clip or a list of clips; raw arrays need `sampling_rate`.
            sampling_rate (`int`, *optional*): rate of the raw arrays; they are resampled to `self.sampling_rate`.
            return_tensors (`str`, *optional*): `"pt"` or `"np"`.

        Returns:
            [`BatchFeature`] with `input_features`, `input_values` (each if a front-end needs it) and `audio_lengths`,
            one row per window (see the class docstring for shapes).
        """
        clips = to_mono_waveforms(raw_speech, sampling_rate, self.sampling_rate)
        windows = self.split_windows(clips)
        data: dict[str, Any] = {}
        if self._mel_extractors:
            power, num_frames = self.power_spectrogram(windows)
            kept = num_frames
            if self.log_mel_length == "longest":
                kept = self.mel_frames_read(max(len(w) for w in windows))
            features = np.empty((len(windows), self.feature_size, kept), dtype=np.float32)
            start = 0
            for n_mels in self._mel_extractors:
                self.log_mel(power, num_frames, n_mels, out=features[:, start : start + n_mels])
                start += n_mels
            data["input_features"] = features
        if self._waveform_extractor is not None:
            data["input_values"] = self.normalized_waveform(windows)
        data["audio_lengths"] = np.array([len(w) for w in windows], dtype=np.int64)
        return BatchFeature(data, tensor_type=return_tensors)


__all__ = ["MoWEFeatureExtractor", "downmix", "read_audio", "resample", "to_mono_waveform", "to_mono_waveforms"]

"""MoWEFeatureExtractor and `to_mono_waveform`: shared front-ends, windows, and every form of audio users hand in."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
import torch
from conftest import SR
from transformers import Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

from modeling_mowe import MoWEConfig, MoWEFeatureExtractor
from modeling_mowe.feature_extraction_mowe import to_mono_waveform, to_mono_waveforms

TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "mowe-tiny-random"
WINDOW = 30 * SR


def noise(seconds: float, seed: int = 0, rate: int = SR) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


def sine(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


@pytest.fixture(scope="module")
def extractor() -> MoWEFeatureExtractor:
    return MoWEFeatureExtractor.from_pretrained(TINY)


def test_tiny_preset_has_one_front_end_per_distinct_kind(extractor):
    config = MoWEConfig.from_pretrained(TINY)
    assert len(config.encoder_configs) == 5
    assert extractor.front_ends == [
        {"kind": "log_mel", "n_mels": 128},
        {"kind": "log_mel", "n_mels": 80},
        {"kind": "waveform"},
    ]
    assert extractor.feature_size == 208
    assert MoWEFeatureExtractor.from_mowe_config(config).to_dict() == extractor.to_dict()
    config.router_type = "none"
    assert MoWEFeatureExtractor.from_mowe_config(config).front_ends == [{"kind": "log_mel", "n_mels": 128}]


@pytest.mark.parametrize("seconds", [[0.025, 3.0, 30.0], [12.345]])
def test_stacked_log_mels_equal_stand_alone_whisper_extractors(extractor, seconds):
    clips = [noise(s, seed=i) for i, s in enumerate(seconds)]
    features = extractor(clips, sampling_rate=SR)["input_features"]
    windows = [np.pad(c, (0, max(0, 400 - len(c)))) for c in clips]
    assert features.shape == (len(clips), 208, 3000) and features.dtype == np.float32
    for start, n_mels in ((0, 128), (128, 80)):
        reference = WhisperFeatureExtractor(feature_size=n_mels)(windows, sampling_rate=SR, return_tensors="np")
        np.testing.assert_allclose(features[:, start : start + n_mels], reference["input_features"], atol=1e-5)


def test_waveform_equals_stand_alone_wav2vec2_extractor(extractor):
    clips = [noise(1.0, seed=1), noise(0.5, seed=2) + 0.3]
    values = extractor(clips, sampling_rate=SR)["input_values"]
    reference = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)(
        clips, sampling_rate=SR, padding="longest", return_tensors="np"
    )["input_values"]
    np.testing.assert_allclose(values, reference, atol=1e-6)
    assert values.shape == (2, SR)
    assert abs(values[1, : SR // 2].mean()) < 1e-4 and abs(values[1, : SR // 2].std() - 1) < 1e-3
    assert not values[1, SR // 2 :].any()


def test_each_front_end_is_computed_once_per_clip(extractor, monkeypatch):
    calls = {"spectrogram": [], "log_mel": [], "waveform": [], "whisper": 0, "wav2vec2": 0}

    def spy(name, method):
        def wrapped(self, *args, **kwargs):
            if name in ("whisper", "wav2vec2"):
                calls[name] += 1
            else:
                calls[name].append(args[0] if name != "log_mel" else args[2])
            return method(self, *args, **kwargs)

        return wrapped

    for name, cls, attr in [
        ("spectrogram", MoWEFeatureExtractor, "power_spectrogram"),
        ("log_mel", MoWEFeatureExtractor, "log_mel"),
        ("waveform", MoWEFeatureExtractor, "normalized_waveform"),
        ("whisper", WhisperFeatureExtractor, "__call__"),
        ("whisper", WhisperFeatureExtractor, "_torch_extract_fbank_features"),
        ("wav2vec2", Wav2Vec2FeatureExtractor, "__call__"),
    ]:
        monkeypatch.setattr(cls, attr, spy(name, getattr(cls, attr)))
    clips = [noise(1.0, seed=i) for i in range(3)]
    extractor(clips, sampling_rate=SR)
    # Five encoders, three distinct front-ends: one STFT, a mel projection per distinct size, one waveform.
    assert len(calls["spectrogram"]) == 1 and len(calls["spectrogram"][0]) == 3
    assert sorted(calls["log_mel"]) == [80, 128]
    assert len(calls["waveform"]) == 1 and len(calls["waveform"][0]) == 3
    assert calls["whisper"] == 0 and calls["wav2vec2"] == 1


def test_batch_gives_the_same_features_as_each_clip_alone(extractor):
    clips = [noise(0.3, seed=3), noise(2.0, seed=4), noise(31.0, seed=5)]
    batch = extractor(clips, sampling_rate=SR)
    rows = 0
    for clip in clips:
        alone = extractor(clip, sampling_rate=SR)
        n = len(alone["audio_lengths"])
        np.testing.assert_allclose(batch["input_features"][rows : rows + n], alone["input_features"], atol=1e-5)
        width = alone["input_values"].shape[1]
        np.testing.assert_allclose(batch["input_values"][rows : rows + n, :width], alone["input_values"], atol=1e-6)
        np.testing.assert_array_equal(batch["audio_lengths"][rows : rows + n], alone["audio_lengths"])
        rows += n
    assert rows == len(batch["audio_lengths"]) == 4


def test_long_clips_are_split_into_windows_in_order(extractor):
    clip = noise(70.0, seed=6)
    out = extractor(clip, sampling_rate=SR, return_tensors="pt")
    assert out["audio_lengths"].tolist() == [WINDOW, WINDOW, 10 * SR] == extractor.window_lengths(len(clip))
    assert out["input_features"].shape == (3, 208, 3000) and out["input_values"].shape == (3, WINDOW)
    for i, start in enumerate((0, WINDOW, 2 * WINDOW)):
        alone = extractor(clip[start : start + WINDOW], sampling_rate=SR)
        np.testing.assert_allclose(out["input_features"][i].numpy(), alone["input_features"][0], atol=1e-5)


def test_short_clips_are_padded_to_min_samples(extractor):
    out = extractor([noise(0.001), np.ones(1, np.float32)], sampling_rate=SR)
    assert extractor.min_samples == 400
    assert out["audio_lengths"].tolist() == [400, 400] == extractor.window_lengths(16) * 2
    assert extractor.window_lengths(WINDOW + 1) == [WINDOW, 400]


def test_save_and_load_round_trip(extractor, tmp_path):
    extractor.save_pretrained(tmp_path)
    saved = (tmp_path / "preprocessor_config.json").read_text()
    assert "_mel_extractors" not in saved and "MoWEFeatureExtractor" in saved
    loaded = MoWEFeatureExtractor.from_pretrained(tmp_path)
    clip = noise(1.5, seed=7)
    for key, value in extractor(clip, sampling_rate=SR).items():
        np.testing.assert_array_equal(loaded(clip, sampling_rate=SR)[key], value)


def test_unknown_front_end_is_rejected():
    with pytest.raises(ValueError, match="kind 'log_mel'"):
        MoWEFeatureExtractor(front_ends=[{"kind": "cqt"}])


# ---- the forms of audio users hand in ------------------------------------------------------------------------


def test_other_rates_are_resampled_like_soxr():
    clip = sine(1.0, 44_100)
    out = to_mono_waveform(clip, 44_100)
    np.testing.assert_array_equal(out, soxr.resample(clip, 44_100, SR).astype(np.float32))
    assert out.dtype == np.float32 and len(out) == SR
    np.testing.assert_array_equal(to_mono_waveform(clip[:SR], SR), clip[:SR])  # 16 kHz is left alone


def test_raw_arrays_need_a_sampling_rate():
    with pytest.raises(ValueError, match=r"without its sampling rate; pass `sampling_rate=`"):
        to_mono_waveform(noise(0.1), None)


@pytest.mark.parametrize("rate", [0, -16_000, float("nan"), "16000", True])
def test_non_positive_or_invalid_sampling_rate(rate):
    with pytest.raises(ValueError, match=r"sampling_rate must be a positive number.*e\.g\. sampling_rate=16000"):
        to_mono_waveform(noise(0.1), rate)


def test_stereo_in_either_axis_order_is_averaged():
    left, right = noise(0.5, seed=1), noise(0.5, seed=2)
    expected = (left + right) / 2
    np.testing.assert_allclose(to_mono_waveform(np.stack([left, right]), SR), expected, atol=1e-7)
    np.testing.assert_allclose(to_mono_waveform(np.stack([left, right], axis=1), SR), expected, atol=1e-7)
    with pytest.raises(ValueError, match="ambiguous.*pass a list of 1-D arrays"):
        to_mono_waveform(np.zeros((20, 2000), np.float32), SR)


@pytest.mark.parametrize("shape", [(2, 2, 100), (1, 1, 1, 100)])
def test_arrays_of_three_or_more_dimensions(shape):
    with pytest.raises(ValueError, match=r"must be 1-D \(mono\) or 2-D.*For a batch, pass a list of clips"):
        to_mono_waveform(np.zeros(shape, np.float32), SR)
    with pytest.raises(ValueError, match="1-D"):
        to_mono_waveforms(torch.zeros(shape), SR)  # an array is one clip, never a batch
    with pytest.raises(ValueError, match="1-D"):
        to_mono_waveform(np.float32(0.5), SR)


@pytest.mark.parametrize("empty", [np.zeros(0, np.float32), np.zeros((2, 0), np.float32), [], torch.zeros(0)])
def test_empty_audio(empty):
    with pytest.raises(ValueError, match="(Empty audio clip|empty list of audio clips)"):
        to_mono_waveforms(empty, SR)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_samples(bad):
    clip = noise(0.1)
    clip[10] = bad
    with pytest.raises(ValueError, match="1 NaN/Inf samples; clean the signal first"):
        to_mono_waveform(clip, SR)


@pytest.mark.parametrize(
    "samples, expected",
    [
        (np.array([0, 16384, -32768, 32767], np.int16), [0.0, 0.5, -1.0, 32767 / 32768]),
        (np.array([0, 2**30, -(2**31)], np.int32), [0.0, 0.5, -1.0]),
        (np.array([128, 192, 0, 255], np.uint8), [0.0, 0.5, -1.0, 127 / 128]),
        (np.array([0, 64, -128], np.int8), [0.0, 0.5, -1.0]),
    ],
)
def test_integer_pcm_is_scaled_to_unit_range(samples, expected):
    out = to_mono_waveform(samples, SR)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_non_numeric_dtypes_are_rejected():
    with pytest.raises(TypeError, match="float or integer PCM"):
        to_mono_waveform(np.ones(100, bool), SR)
    with pytest.raises(TypeError, match="float or integer PCM"):
        to_mono_waveform(np.ones(100, np.complex64), SR)


def test_python_lists_and_torch_tensors_match_numpy():
    clip = noise(0.2, seed=8)
    expected = to_mono_waveform(clip, SR)
    np.testing.assert_array_equal(to_mono_waveform(clip.tolist(), SR), expected)
    np.testing.assert_array_equal(to_mono_waveform(torch.from_numpy(clip).requires_grad_(), SR), expected)
    np.testing.assert_allclose(to_mono_waveform(torch.from_numpy(clip).double(), SR), expected, atol=1e-7)
    np.testing.assert_allclose(to_mono_waveform(torch.from_numpy(clip).bfloat16(), SR), expected, atol=1e-2)
    pcm = torch.tensor([0, 16384, -32768], dtype=torch.int16)
    np.testing.assert_allclose(to_mono_waveform(pcm, SR), [0.0, 0.5, -1.0])
    np.testing.assert_allclose(to_mono_waveform(torch.from_numpy(np.stack([clip, clip])), SR), expected, atol=1e-7)
    assert len(to_mono_waveforms([clip.tolist(), clip.tolist()], SR)) == 2


@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("WAV", "FLOAT")])
def test_files_are_read_at_their_own_rate(tmp_path, fmt, subtype):
    clip = np.stack([sine(0.5, 22_050, 440), sine(0.5, 22_050, 660)], axis=1)
    path = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(path, clip, 22_050, format=fmt, subtype=subtype)
    data, rate = soundfile.read(path)
    expected = soxr.resample(data.mean(axis=1).astype(np.float32), rate, SR)
    for source in (str(path), path, path.read_bytes()):
        np.testing.assert_allclose(to_mono_waveform(source, sampling_rate=8_000), expected, atol=1e-6)
    np.testing.assert_allclose(to_mono_waveform({"bytes": None, "path": str(path)}, None), expected, atol=1e-6)


def test_datasets_audio_cells(tmp_path):
    import datasets

    clip = noise(0.5, seed=9, rate=8_000)
    path = tmp_path / "cell.wav"
    soundfile.write(path, clip, 8_000, subtype="FLOAT")
    expected = soxr.resample(clip, 8_000, SR)
    decoded = {"array": clip, "sampling_rate": 8_000, "path": str(path)}
    np.testing.assert_allclose(to_mono_waveform(decoded, None), expected, atol=1e-6)
    buffer = io.BytesIO()
    soundfile.write(buffer, clip, 8_000, format="WAV", subtype="FLOAT")
    np.testing.assert_allclose(to_mono_waveform({"bytes": buffer.getvalue(), "path": None}, None), expected, atol=1e-6)
    column = datasets.Dataset.from_dict({"audio": [str(path)]}).cast_column("audio", datasets.Audio(decode=False))
    cell = column[0]["audio"]
    assert set(cell) == {"bytes", "path"}
    np.testing.assert_allclose(to_mono_waveform(cell, None), expected, atol=1e-6)


def test_torchcodec_style_decoders():
    clip = noise(0.25, seed=10, rate=8_000)

    class Samples:
        data, sample_rate = torch.from_numpy(np.stack([clip, clip])), 8_000

    class Decoder:  # the interface of torchcodec's AudioDecoder, which `datasets` returns for Audio columns
        def get_all_samples(self):
            return Samples()

    np.testing.assert_allclose(to_mono_waveform(Decoder(), None), soxr.resample(clip, 8_000, SR), atol=1e-6)


@pytest.mark.parametrize(
    "value, error, match",
    [
        ({"text": "hello"}, ValueError, r"needs 'array' \+ 'sampling_rate'.*got keys \['text'\]"),
        ("not a file", ValueError, "does not exist; pass an existing wav/flac/ogg path"),
        ("https://example.com/a.wav", ValueError, "download the file and pass its path"),
        (b"not audio bytes", ValueError, "Could not read audio bytes as audio"),
        (object(), TypeError, "Expected audio as a numpy array.*got object"),
        ([1.0, "a"], TypeError, "must hold numbers"),
    ],
)
def test_objects_that_are_not_audio(value, error, match):
    with pytest.raises(error, match=match):
        to_mono_waveform(value, SR)


def test_a_directory_is_not_an_audio_file(tmp_path):
    with pytest.raises(ValueError, match="is a directory, not an audio file; pass the path of one"):
        to_mono_waveform(tmp_path, SR)
    with pytest.raises(ValueError, match="is a directory"):
        to_mono_waveform({"bytes": None, "path": str(tmp_path)}, None)


@pytest.mark.parametrize("kept_bytes", [44, 60, 20_000])  # the header only, 8 samples, most of the file
def test_a_wav_file_cut_off_after_its_header_names_the_problem(tmp_path, kept_bytes):
    buffer = io.BytesIO()
    soundfile.write(buffer, noise(1.0), SR, format="WAV", subtype="PCM_16")
    whole = buffer.getvalue()
    path = tmp_path / "cut.wav"
    path.write_bytes(whole[:kept_bytes])
    for source in (path, whole[:kept_bytes]):
        with pytest.raises(ValueError, match=rf"end after {kept_bytes} of the {len(whole)} bytes .* cut off"):
            to_mono_waveform(source, None)
    path.write_bytes(whole)
    assert to_mono_waveform(path, None).shape == (SR,)


def test_text_file_is_not_audio(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not audio")
    with pytest.raises(ValueError, match="Could not read file .*notes.txt.* as audio"):
        to_mono_waveform(path, SR)


def test_batch_errors_name_the_clip(extractor):
    with pytest.raises(ValueError, match="Audio clip 1: Empty audio clip"):
        extractor([noise(0.1), np.zeros(0, np.float32)], sampling_rate=SR)
    with pytest.raises(ValueError, match="Audio clip 0: .*NaN/Inf"):
        extractor([np.full(100, np.nan, np.float32)], sampling_rate=SR)


def test_dynamic_mode_log_mels_end_at_the_longest_window_with_the_same_values():
    """`dynamic_audio_length` models get log-mels only as long as the batch's longest window (even frame count),
    equal to the 30 s ones on every frame kept; clips over 30 s keep their full windows; padded models are
    unchanged."""
    config = MoWEConfig.from_pretrained(TINY, dynamic_audio_length=True)
    short = MoWEFeatureExtractor.from_mowe_config(config)
    full = MoWEFeatureExtractor.from_mowe_config(config, log_mel_length="chunk")
    clips = [noise(s, seed=i) for i, s in enumerate([1.1, 2.9, 0.01, 1.234])]
    kept = short(clips, sampling_rate=SR)["input_features"]
    reference = full(clips, sampling_rate=SR)["input_features"]
    assert short.log_mel_length == "longest" and kept.shape == (4, 208, 2 * ((int(2.9 * SR) // 160 + 1) // 2))
    np.testing.assert_array_equal(kept, reference[..., : kept.shape[-1]])
    assert short([noise(31.3)], sampling_rate=SR)["input_features"].shape == (2, 208, 3000)
    config.dynamic_audio_length = False
    assert MoWEFeatureExtractor.from_mowe_config(config)(clips, sampling_rate=SR)["input_features"].shape[-1] == 3000


def test_short_log_mels_give_the_model_the_same_outputs():
    """The dynamic-mode model reads only the kept frames: logits and router choices equal those from 30 s log-mels."""
    from modeling_mowe import MoWEForConditionalGeneration

    config = MoWEConfig.from_pretrained(TINY, dynamic_audio_length=True)
    torch.manual_seed(0)
    model = MoWEForConditionalGeneration(config).eval()
    clips = [noise(s, seed=i) for i, s in enumerate([1.3, 0.7, 2.05])]
    extractors = {
        length: MoWEFeatureExtractor.from_mowe_config(config, log_mel_length=length) for length in ("longest", "chunk")
    }
    with torch.no_grad():
        outputs = {
            length: model.get_audio_features(**extractor(clips, sampling_rate=SR, return_tensors="pt"))
            for length, extractor in extractors.items()
        }
    torch.testing.assert_close(outputs["longest"].pooler_output, outputs["chunk"].pooler_output, atol=1e-5, rtol=1e-5)
    assert torch.equal(outputs["longest"].router_indices, outputs["chunk"].router_indices)


def test_unknown_log_mel_length_is_refused():
    with pytest.raises(ValueError, match="log_mel_length"):
        MoWEFeatureExtractor(log_mel_length="short")

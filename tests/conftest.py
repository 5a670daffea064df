"""Shared fixtures for the model tests: the tiny preset's config and processor, and audio/text inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_mowe.encoders import SAMPLING_RATE

TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "mowe-tiny-random"
SR = SAMPLING_RATE
# Proof helpers that tests share with the benchmarks (speech_checks, vllm_compare) live in benchmarks/.
sys.path.insert(0, str(TINY.parents[1] / "benchmarks"))


def tiny_whisper(num_mel_bins: int, d_model: int):
    """A 1-layer random `WhisperModel` with `num_mel_bins` mels: a stand-in for a pretrained Whisper checkpoint."""
    from transformers import WhisperConfig, WhisperModel

    return WhisperModel(
        WhisperConfig(
            num_mel_bins=num_mel_bins, d_model=d_model, encoder_layers=1, encoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32, vocab_size=16,
            max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        )
    )


@pytest.fixture
def tiny_config():
    """A fresh `MoWEConfig` of the tiny preset (tests may edit it)."""
    from modeling_mowe import MoWEConfig

    return MoWEConfig.from_pretrained(TINY)


def tiny_processor(dynamic_audio_length: bool = False):
    """The tiny preset's processor; for a `dynamic_audio_length` model, log-mels only as long as each batch's longest
    window, as `MoWEFeatureExtractor.from_mowe_config` sets it up (such a model reads the width it is given)."""
    from modeling_mowe import MoWEProcessor

    processor = MoWEProcessor.from_pretrained(TINY)
    if dynamic_audio_length:
        processor.feature_extractor.log_mel_length = "longest"
    return processor


@pytest.fixture(scope="session")
def processor():
    return tiny_processor()


def make_clip(seconds: float, seed: int = 0, kind: str = "noise") -> np.ndarray:
    """A float32 16 kHz test clip: white noise, or a sine whose pitch depends on `seed`."""
    n = int(seconds * SR)
    if kind == "sine":
        t = np.arange(n) / SR
        return (0.5 * np.sin(2 * np.pi * (220 + 40 * seed) * t)).astype(np.float32)
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def make_inputs(processor, texts, clips, padding_side="right"):
    """Processor outputs as torch tensors for `texts` (each with its `<|audio|>`) and `clips`."""
    processor.tokenizer.padding_side = padding_side
    return dict(processor(text=texts, audio=clips, sampling_rate=SR, return_tensors="pt", padding=True))


def build_model(config, seed: int = 0):
    """A seeded, randomly initialised `MoWEForConditionalGeneration` in eval mode."""
    from modeling_mowe import MoWEForConditionalGeneration

    torch.manual_seed(seed)
    return MoWEForConditionalGeneration(config).eval()


@pytest.fixture(scope="session")
def benchmark_dir(tmp_path_factory):
    """The tiny synthetic benchmark (espeak-ng speech and beeps), built once per test run."""
    import shutil

    from modeling_mowe.data import BenchmarkConfig, build_benchmark

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/setup.sh installs it)")
    cache = tmp_path_factory.mktemp("benchmark")
    config = BenchmarkConfig.tiny()
    build_benchmark(cache, config, progress=False)
    return cache / config.fingerprint()


def greedy_answer(model, processor, audio, question: str, sampling_rate: int | None = None, max_new_tokens: int = 64):
    """What the card, handler, scripts and Space should print: the decoded greedy continuation of a one-clip chat
    (`handler.answer`, the package's own copy)."""
    from modeling_mowe.handler import answer

    return answer(model, processor, audio, question, sampling_rate, max_new_tokens=max_new_tokens)


@pytest.fixture
def fast_config(tiny_config, processor):
    """The tiny preset with Whisper encoding only the real audio length (much faster than 30 s padding); while it is
    in use, the `processor` gives log-mels only as long as the batch's longest window, as `from_mowe_config` sets up
    the processor of such a model (the model reads the width it is given)."""
    tiny_config.dynamic_audio_length = True
    processor.feature_extractor.log_mel_length = "longest"
    yield tiny_config
    processor.feature_extractor.log_mel_length = "chunk"


# Prepended to scripts run by `run_without_package`: `modeling_mowe` (editable install included) cannot be imported,
# so only the code a saved folder carries can load it, as on a machine where the package is not installed.
BLOCK_PACKAGE = '''
import importlib.abc, sys

class _BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "modeling_mowe" or fullname.startswith("modeling_mowe."):
            raise ImportError(f"{fullname} is blocked: only a checkpoint's own code may be used")
        return None

sys.meta_path.insert(0, _BlockPackage())
try:
    import modeling_mowe  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("modeling_mowe is importable: the test would prove nothing")
'''


def run_without_package(script: str, *args: str, cwd: Path, timeout: int = 300, pythonpath: Path | None = None):
    """Run `script` (python source) in a child process where `modeling_mowe` cannot be imported (and `pythonpath`,
    e.g. another transformers version, comes first on `sys.path`)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "modules_cache"), PYTHONNOUSERSITE="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-c", BLOCK_PACKAGE + script, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def tiny_hubert():
    """A 1-layer random `HubertModel`: a stand-in for a pretrained waveform encoder."""
    from transformers import HubertConfig, HubertModel

    config = HubertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
    )
    return HubertModel(config)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A saved 1-layer Llama with the tiny preset's tokenizer: a stand-in for a pretrained LLM folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llm")
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

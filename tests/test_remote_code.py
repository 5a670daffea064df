"""A saved checkpoint loads with `trust_remote_code=True` in a process where `modeling_mowe` cannot be imported."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
import torch
from conftest import TINY, build_model, make_clip, make_inputs, run_without_package, tiny_processor

import modeling_mowe  # noqa: F401  (registers the Auto classes)

TEXTS = ["Transcribe the audio. <|audio|>", "<|audio|> Is the speaker male or female? Answer:"]

# Runs first in the child (after conftest.BLOCK_PACKAGE): load the expected outputs.
PRELUDE = textwrap.dedent(
    """
    import torch
    from transformers import AutoModel, AutoProcessor
    folder, expected = sys.argv[1], torch.load(sys.argv[2], weights_only=False)
    """
)

MODEL_CHECK = """
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__name__ == "MoWEForConditionalGeneration", type(model)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
with torch.no_grad():
    logits = model(**expected["inputs"]).logits
assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
tokens = model.generate(**expected["inputs"], **expected["gen"])
assert torch.equal(tokens, expected["tokens"]), (tokens, expected["tokens"])
print("MODEL OK")
"""

PROCESSOR_CHECK = """
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(processor).__name__ == "MoWEProcessor", type(processor)
processor.tokenizer.padding_side = "left"
inputs = processor(text=expected["texts"], audio=expected["clips"], sampling_rate=16000, return_tensors="pt",
                   padding=True)
assert sorted(inputs) == sorted(expected["inputs"]), (sorted(inputs), sorted(expected["inputs"]))
for key, value in expected["inputs"].items():
    assert torch.equal(inputs[key], value), key
print("PROCESSOR OK")
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from modeling_mowe import MoWEConfig

    root = tmp_path_factory.mktemp("remote")
    config = MoWEConfig.from_pretrained(TINY)
    config.dynamic_audio_length = True
    model = build_model(config, seed=31)
    processor = tiny_processor(dynamic_audio_length=True)
    folder = root / "mowe-checkpoint"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    clips = [make_clip(0.8, seed=1), make_clip(1.7, seed=2, kind="sine")]
    inputs = make_inputs(processor, TEXTS, clips, padding_side="left")
    gen = {"max_new_tokens": 4, "do_sample": False, "eos_token_id": None, "pad_token_id": 1}
    with torch.no_grad():
        logits = model(**inputs).logits
    expected = {
        "inputs": inputs,
        "logits": logits,
        "gen": gen,
        "tokens": model.generate(**inputs, **gen),
        "texts": TEXTS,
        "clips": clips,
    }
    torch.save(expected, root / "expected.pt")
    return root, folder


def _run_isolated(root, folder, check: str) -> subprocess.CompletedProcess:
    workdir = root / "isolated"
    workdir.mkdir(exist_ok=True)
    return run_without_package(PRELUDE + check, str(folder), str(root / "expected.pt"), cwd=workdir)


def test_saved_folder_carries_the_code_and_auto_map(saved):
    _, folder = saved
    files = {p.name for p in folder.iterdir()}
    assert {"configuration_mowe.py", "modeling_mowe.py", "encoders.py", "routing.py", "model.safetensors"} <= files
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_mowe.MoWEForConditionalGeneration"
    assert auto_map["AutoConfig"] == "configuration_mowe.MoWEConfig"


def test_remote_code_model_loads_matches_and_generates_without_the_package(saved):
    result = _run_isolated(*saved, MODEL_CHECK)
    assert result.returncode == 0 and "MODEL OK" in result.stdout, result.stdout + result.stderr


def test_remote_code_processor_loads_and_matches_without_the_package(saved):
    result = _run_isolated(*saved, PROCESSOR_CHECK)
    assert result.returncode == 0 and "PROCESSOR OK" in result.stdout, result.stdout + result.stderr

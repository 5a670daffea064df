"""The remote code runs on both ends of the transformers range pyproject allows, as `pip install` resolves them.

A checkpoint saved here is loaded with `trust_remote_code=True` in a child process where `modeling_mowe` cannot be
imported: with the installed transformers, with the lowest version pyproject allows (`LOWEST`) and with the newest one
pip resolves for pyproject's range (the installed one, or a newer release). A version other than the installed one
goes into `.cache/transformers-<version>` (once; pip's cache makes reruns fast) together with whatever else pip's
dry run says this environment needs for it (huggingface_hub, tokenizers). Every run must render and tokenize chats,
mark assistant tokens, and give the logits and greedy tokens computed here, also when `generate` continues from a
returned cache.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import SR, TINY, build_model, run_without_package, tiny_processor

from modeling_mowe import MoWEConfig

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT_RANGE = re.search(r'"transformers(>=[\d.]+,<[\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
PYPROJECT_BOUND = re.match(r">=([\d.]+)", PYPROJECT_RANGE).group(1)
LOWEST = "5.15.1"
NETWORK_ERRORS = (
    "No matching distribution", "Could not find a version", "Failed to establish", "Network is unreachable",
    "Temporary failure in name resolution", "ConnectionError",
)

CHECK = """
import numpy as np, sys, torch, transformers
from transformers import AutoModel, AutoProcessor
folder, expected = sys.argv[1], torch.load(sys.argv[2], weights_only=False)
print("transformers", transformers.__version__, transformers.__file__)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
chats = expected["chats"]
assert processor.apply_chat_template(chats) == expected["texts"], processor.apply_chat_template(chats)
masked = processor.apply_chat_template(chats, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                       return_tensors="pt")
for key, value in expected["masked"].items():
    assert torch.equal(masked[key], value), (key, masked[key], value)
prompt = processor.apply_chat_template([chats[0][:1]], add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
with torch.no_grad():
    logits = model(**prompt).logits
torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
gen = dict(do_sample=False, eos_token_id=None, pad_token_id=1)
tokens = model.generate(**prompt, max_new_tokens=4, **gen)
assert torch.equal(tokens, expected["tokens"]), (tokens, expected["tokens"])
first = model.generate(**prompt, max_new_tokens=2, return_dict_in_generate=True, **gen)
continued = dict(prompt, input_ids=expected["continued"]["input_ids"],
                 attention_mask=torch.ones_like(expected["continued"]["input_ids"]))
tokens = model.generate(**continued, past_key_values=first.past_key_values, max_new_tokens=3, **gen)
assert torch.equal(tokens, expected["continued"]["tokens"]), (tokens, expected["continued"]["tokens"])
print("VERSION OK")
"""


def _clip(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    config = MoWEConfig.from_pretrained(TINY)
    config.dynamic_audio_length = True
    model = build_model(config, seed=5)
    processor = tiny_processor(dynamic_audio_length=True)
    folder = root / "checkpoint"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    audio = {"type": "audio", "audio": _clip(0.6, 1), "sampling_rate": SR}
    chats = [
        [
            {"role": "user", "content": [audio, {"type": "text", "text": "Pitch?"}]},
            {"role": "assistant", "content": "low"},
        ],
        [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": "high"}],
    ]
    masked = processor.apply_chat_template(
        chats, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    prompt = processor.apply_chat_template(
        [chats[0][:1]], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**prompt).logits
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=1)
    # A conversation that goes on after a 2-token answer: its fresh greedy continuation, which `generate` must also
    # give when it continues from the answer's cache.
    answer = model.generate(**prompt, max_new_tokens=2, **gen)
    follow_up = torch.cat([answer, torch.tensor([[7, 8]])], dim=1)
    continued = dict(prompt, input_ids=follow_up, attention_mask=torch.ones_like(follow_up))
    expected = {
        "chats": chats,
        "texts": processor.apply_chat_template(chats),
        "masked": dict(masked),
        "logits": logits,
        "tokens": model.generate(**prompt, max_new_tokens=4, **gen),
        "continued": {"input_ids": follow_up, "tokens": model.generate(**continued, max_new_tokens=3, **gen)},
    }
    assert masked["assistant_masks"].sum() > 0
    torch.save(expected, root / "expected.pt")
    return root, folder


def pip_resolves(requirement: str, *options: str) -> dict[str, str]:
    """What `pip install requirement` would install into this environment (pip's dry-run report): {name: version},
    empty where the environment already satisfies it. Skips the test where PyPI is unreachable."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", *options, requirement],
        capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0:
        if any(error in result.stderr for error in NETWORK_ERRORS):
            pytest.skip(f"PyPI is unreachable, pip cannot resolve {requirement}: {result.stderr[-300:]}")
        raise RuntimeError(f"pip could not resolve {requirement}:\n{result.stderr}")
    report = json.loads(result.stdout)
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}


def install_transformers(version: str) -> Path:
    """`transformers==version`, and what pip resolves with it for this environment, in `.cache/transformers-<version>`
    (for PYTHONPATH), once."""
    target = ROOT / ".cache" / f"transformers-{version}"
    if (target / f"transformers-{version}.dist-info").is_dir():
        return target
    packages = pip_resolves(f"transformers=={version}")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         *(f"{name}=={pinned}" for name, pinned in packages.items())],
        capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0:
        if any(error in result.stderr for error in NETWORK_ERRORS):
            pytest.skip(f"PyPI is unreachable, transformers=={version} cannot be installed: {result.stderr[-300:]}")
        raise RuntimeError(f"pip could not install transformers=={version}:\n{result.stderr}")
    return target


def run_check(root: Path, folder: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    workdir = root / f"run-{pythonpath.name if pythonpath else 'installed'}"
    workdir.mkdir(exist_ok=True)
    return run_without_package(CHECK, str(folder), str(root / "expected.pt"), cwd=workdir, pythonpath=pythonpath)


def test_pyproject_lower_bound_is_the_tested_lowest_version():
    assert PYPROJECT_BOUND == LOWEST


def test_remote_code_runs_on_the_installed_transformers(saved):
    result = run_check(*saved)
    assert result.returncode == 0 and "VERSION OK" in result.stdout, result.stdout + result.stderr
    assert f"transformers {transformers.__version__}" in result.stdout


@pytest.mark.slow
def test_remote_code_runs_on_the_newest_transformers_pip_resolves(saved):
    newest = pip_resolves(f"transformers{PYPROJECT_RANGE}", "--upgrade", "--upgrade-strategy", "only-if-needed")
    # Nothing to install: the installed version is the newest that pyproject's range allows.
    version = newest.get("transformers", transformers.__version__)
    target = install_transformers(version) if "transformers" in newest else None
    result = run_check(*saved, pythonpath=target)
    assert result.returncode == 0 and "VERSION OK" in result.stdout, result.stdout + result.stderr
    assert f"transformers {version} {target or ''}" in result.stdout


@pytest.mark.slow
def test_remote_code_runs_on_the_lowest_transformers(saved):
    target = install_transformers(LOWEST)
    result = run_check(*saved, pythonpath=target)
    assert result.returncode == 0 and "VERSION OK" in result.stdout, result.stdout + result.stderr
    assert f"transformers {LOWEST} {target}" in result.stdout

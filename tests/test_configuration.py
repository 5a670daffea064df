"""MoWEConfig is a declarative transformers 5 config: folders saved before load unchanged; it pickles by value."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import cloudpickle
import torch
from conftest import TINY, build_model, make_clip, make_inputs

from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration, MoWEProcessor

# config.json written by `save_pretrained` on main at 1d1b18b (the config with `_as_config` and dotted sub-config
# keys) for the tiny preset with `dynamic_audio_length=True`.
OLD_MAIN_CONFIG = Path(__file__).parent / "fixtures" / "config_main_1d1b18b.json"


def _comparable(config: MoWEConfig) -> dict:
    data = config.to_dict()
    data.pop("transformers_version", None)
    return data


def test_presets_load_to_the_configs_they_describe():
    for preset in sorted(TINY.parent.iterdir()):
        config = MoWEConfig.from_pretrained(preset)
        assert config.weak_encoder_configs and config.router_type in ("both", "data_dependent", "data_independent")
        assert _comparable(MoWEConfig.from_dict(config.to_dict())) == _comparable(config)


def test_make_presets_writes_the_committed_presets(tmp_path):
    """`scripts/make_presets.py` reproduces what hub_configs/ holds: the same configs once loaded (their JSON spells
    nested defaults as the transformers of the day saves them) and the tokenizer, template and processor files byte
    for byte."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_presets.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    written = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*") if path.is_file())
    assert len(written) == 7 and {path.parts[0] for path in written} == {
        "mowe-tiny-random", "mowe-llama3-8b-4x-whisper-tiny", "mowe-llama3-8b-2x-whisper-tiny-2x-hubert"
    }
    for path in written:
        if path.name == "config.json":
            new, committed = (MoWEConfig.from_pretrained(root / path.parent) for root in (tmp_path, TINY.parent))
            assert _comparable(new) == _comparable(committed), path
        else:
            assert (tmp_path / path).read_bytes() == (TINY.parent / path).read_bytes(), path


def test_a_checkpoint_saved_by_the_previous_config_loads_to_the_same_config_and_logits(tmp_path):
    config = MoWEConfig.from_pretrained(TINY)
    config.dynamic_audio_length = True
    model = build_model(config, seed=3)
    model.save_pretrained(tmp_path)
    reloaded = MoWEForConditionalGeneration.from_pretrained(tmp_path)
    shutil.copy(OLD_MAIN_CONFIG, tmp_path / "config.json")  # the same model, described in the old format

    loaded = MoWEForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert _comparable(loaded.config) == _comparable(reloaded.config)
    inputs = make_inputs(MoWEProcessor.from_pretrained(TINY), ["<|audio|> hi"], [make_clip(0.7)])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_config_pickles():
    config = MoWEConfig.from_pretrained(TINY)
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        restored = loads(dumps(config))
        assert _comparable(restored) == _comparable(config)


# vLLM pickles remote-code modules by value to ship them to its workers: the worker cannot import the module, so the
# config class must come whole from the pickle. The module is a copy of the remote code in a package of its own.
PICKLE_BY_VALUE = """
import sys, cloudpickle
sys.path.insert(0, sys.argv[1])
import mowe_remote_code
from mowe_remote_code import configuration_mowe, encoders  # noqa: F401
cloudpickle.register_pickle_by_value(mowe_remote_code)  # the whole package, as vLLM does with remote code
config = configuration_mowe.MoWEConfig.from_pretrained(sys.argv[2])
open(sys.argv[3], "wb").write(cloudpickle.dumps(config))
"""
UNPICKLE_ELSEWHERE = """
import sys, cloudpickle
config = cloudpickle.loads(open(sys.argv[1], "rb").read())
assert type(config).__module__ == "mowe_remote_code.configuration_mowe", type(config).__module__
assert config.router_type == "both" and len(config.weak_encoder_configs) == 4, config
try:
    import mowe_remote_code  # noqa: F401
except ImportError:
    print("UNPICKLED", type(config).__name__)
"""


def test_the_config_module_pickles_by_value(tmp_path):
    code = Path(sys.modules[MoWEConfig.__module__].__file__).parent
    package = tmp_path / "code" / "mowe_remote_code"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in ("configuration_mowe.py", "encoders.py"):  # the config's relative imports
        shutil.copy(code / name, package / name)
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    pickled = tmp_path / "config.pkl"

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", script, *args], cwd=elsewhere, capture_output=True, text=True, timeout=120
        )

    dumped = run(PICKLE_BY_VALUE, str(tmp_path / "code"), str(TINY), str(pickled))
    assert dumped.returncode == 0, dumped.stderr
    loaded = run(UNPICKLE_ELSEWHERE, str(pickled))
    assert loaded.returncode == 0 and "UNPICKLED MoWEConfig" in loaded.stdout, loaded.stdout + loaded.stderr

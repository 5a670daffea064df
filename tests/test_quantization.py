"""Quantized loading (bitsandbytes 4-bit / 8-bit) and QLoRA training, on CPU with the tiny preset."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, make_clip, make_inputs, tiny_processor
from torch import nn

from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModel, BitsAndBytesConfig  # noqa: E402

QUANTIZED = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
FULL_PRECISION_PARTS = (
    "weak_encoders", "weak_projections", "router_dependent", "router_independent", "multi_modal_projector"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved tiny MoWE model (fp32, dynamic audio length for speed) with its processor and code."""
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = MoWEForConditionalGeneration(MoWEConfig.from_pretrained(TINY, dynamic_audio_length=True))
    model.save_pretrained(path)
    tiny_processor(dynamic_audio_length=True).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def inputs():
    processor = tiny_processor(dynamic_audio_length=True)
    return make_inputs(
        processor, ["<|audio|> Transcribe.", "<|audio|> How many?"], [make_clip(1.0, 1), make_clip(1.6, 2)]
    )


def quantized_modules(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, QUANTIZED)}


def linear_layers(module: nn.Module, prefix: str) -> set[str]:
    return {f"{prefix}.{name}" for name, child in module.named_modules() if isinstance(child, nn.Linear)}


def four_bit(**kwargs) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, **kwargs)


def test_4bit_load_quantizes_the_llm_and_nothing_else(folder, inputs):
    reference = MoWEForConditionalGeneration.from_pretrained(folder).eval()
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, quantization_config=four_bit())

    assert model.is_loaded_in_4bit
    assert quantized_modules(model) == linear_layers(reference.model.language_model, "model.language_model")
    assert not isinstance(model.lm_head, QUANTIZED)
    with torch.no_grad():
        expected, logits = reference(**inputs).logits, model(**inputs).logits
    assert torch.isfinite(logits).all()
    # 4-bit weights: near the fp32 logits (cosine 0.98 measured on this random model), not equal to them.
    assert nn.functional.cosine_similarity(logits.flatten(), expected.flatten(), dim=0) > 0.95
    assert not torch.equal(logits, expected)


def test_explicit_skip_list_quantizes_the_base_encoder_and_keeps_trained_parts(folder, inputs):
    model = MoWEForConditionalGeneration.from_pretrained(
        folder, quantization_config=four_bit(llm_int8_skip_modules=["lm_head"])
    )
    quantized = quantized_modules(model)
    tower = model.model.audio_tower
    assert any(name.startswith("model.audio_tower.base_encoder.") for name in quantized)
    assert linear_layers(tower.base_encoder, "model.audio_tower.base_encoder") <= quantized
    assert not any(part in name for name in quantized for part in FULL_PRECISION_PARTS)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_8bit_load_quantizes_the_llm_only(folder):
    model = MoWEForConditionalGeneration.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    assert model.is_loaded_in_8bit
    assert {name.split(".")[1] for name in quantized_modules(model)} == {"language_model"}


def test_fp16_load_keeps_the_trained_parts_in_fp32(folder):
    model = MoWEForConditionalGeneration.from_pretrained(folder, dtype=torch.float16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if any(part in n for part in FULL_PRECISION_PARTS)} == {torch.float32}
    assert {d for n, d in dtypes.items() if "language_model" in n or "base_encoder" in n} == {torch.float16}


def test_saved_4bit_folder_reloads_quantized_with_the_same_logits(folder, inputs, tmp_path):
    model = MoWEForConditionalGeneration.from_pretrained(folder, quantization_config=four_bit())
    model.save_pretrained(tmp_path)  # before any CPU inference, which repacks the weights (bf16 scales)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["load_in_4bit"] and saved["quant_method"] == "bitsandbytes"

    reloaded = MoWEForConditionalGeneration.from_pretrained(tmp_path)
    assert quantized_modules(reloaded) == quantized_modules(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def _save_parts(tmp_path) -> dict[str, str]:
    """The tiny preset's parts saved as standalone checkpoints: base, one weak encoder, the LLM."""
    from transformers import LlamaForCausalLM, WhisperForConditionalGeneration

    config = MoWEConfig.from_pretrained(TINY)
    torch.manual_seed(0)
    parts = {
        "base": WhisperForConditionalGeneration(config.base_encoder_config),
        "weak": WhisperForConditionalGeneration(config.weak_encoder_configs[0]),
        "llm": LlamaForCausalLM(config.text_config),
    }
    for name, part in parts.items():
        part.save_pretrained(tmp_path / name)
    return {name: str(tmp_path / name) for name in parts}


def test_from_components_quantizes_as_from_pretrained_does(tmp_path, inputs):
    paths = _save_parts(tmp_path)
    composed = MoWEForConditionalGeneration.from_components(
        paths["base"], [paths["weak"]], paths["llm"], audio_token_id=4, quantization_config=four_bit()
    )
    assert composed.is_loaded_in_4bit and composed.hf_quantizer is not None
    full = MoWEForConditionalGeneration.from_components(paths["base"], [paths["weak"]], paths["llm"], audio_token_id=4)
    assert quantized_modules(composed) == linear_layers(full.model.language_model, "model.language_model")

    composed.save_pretrained(tmp_path / "composed")
    reloaded = MoWEForConditionalGeneration.from_pretrained(tmp_path / "composed")
    assert quantized_modules(reloaded) == quantized_modules(composed)


def test_from_components_refuses_a_part_loaded_quantized(tmp_path):
    from transformers import AutoModelForCausalLM

    paths = _save_parts(tmp_path)
    llm = AutoModelForCausalLM.from_pretrained(paths["llm"], quantization_config=four_bit())
    with pytest.raises(ValueError, match="loaded quantized.*quantization_config="):
        MoWEForConditionalGeneration.from_components(paths["base"], [paths["weak"]], llm)


# ------------------------------------------------------------------------------------------------------------- QLoRA


@pytest.fixture(scope="module")
def rows():
    """Four conversational rows: a sine clip and a one-word answer (no espeak-ng needed)."""
    import datasets

    return datasets.Dataset.from_list(
        [
            {
                "audio": {"array": make_clip(1.0 + 0.25 * i, seed=i, kind="sine"), "sampling_rate": 16_000},
                "messages": [
                    {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Low or high?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": ["low", "high"][i % 2]}]},
                ],
            }
            for i in range(4)
        ]
    )


def sft_args(output_dir, **overrides):
    from trl import SFTConfig

    defaults = dict(
        output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to="none", bf16=False, seed=0, disable_tqdm=True, dataloader_pin_memory=False,
    )
    return SFTConfig(**{**defaults, **overrides})  # gradient checkpointing: SFTConfig's default (on)


def test_qlora_trains_lora_and_full_precision_parts_and_reloads_onto_a_fresh_4bit_base(folder, rows, inputs, tmp_path):
    from peft import PeftModel

    from modeling_mowe.training import make_sft_trainer

    processor = tiny_processor(dynamic_audio_length=True)
    model = MoWEForConditionalGeneration.from_pretrained(folder, quantization_config=four_bit())
    trainer = make_sft_trainer(model, processor, sft_args(tmp_path / "run"), rows, use_lora=True, lora_r=4)
    assert trainer.model.is_gradient_checkpointing

    trainable = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    full = {name: p for name, p in trainable.items() if "lora_" not in name}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    for part in FULL_PRECISION_PARTS:
        assert any(part in name for name in full), part
    assert all("language_model" in name for name in trainable if "lora_" in name)
    assert not any("base_encoder" in name for name in trainable)
    before = {name: p.detach().clone() for name, p in trainable.items()}
    trainer.train()
    changed = {name for name, p in trainable.items() if not torch.equal(p, before[name])}
    assert any("lora_B" in name for name in changed) and any("multi_modal_projector" in name for name in changed)
    assert any("router_dependent" in name for name in changed)

    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**inputs).logits
    trainer.save_model(str(tmp_path / "adapter"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as saved:
        projector = [k for k in saved.keys() if "multi_modal_projector" in k]
        assert projector and {saved.get_tensor(k).dtype for k in projector} == {torch.float32}

    base = MoWEForConditionalGeneration.from_pretrained(folder, quantization_config=four_bit())
    for module in base.modules():  # the trained model's 4-bit path (fp32), not the bf16 CPU inference kernel
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=1e-5)


def test_qlora_gradients_are_the_same_after_an_evaluation(folder, rows, inputs, tmp_path):
    from modeling_mowe.training import make_sft_trainer

    processor = tiny_processor(dynamic_audio_length=True)
    model = MoWEForConditionalGeneration.from_pretrained(folder, quantization_config=four_bit())
    model = make_sft_trainer(model, processor, sft_args(tmp_path), rows, use_lora=True, lora_r=4).model
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def gradients():
        model.train()
        model.zero_grad()
        torch.manual_seed(0)  # the same LoRA dropout masks
        model(**inputs, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(**inputs)  # on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights here unless told not to
    after = gradients()
    assert before.keys() == after.keys() and any("lora_A" in name for name in before)
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)


@pytest.mark.parametrize(
    "options, message",
    [
        pytest.param({}, "use_lora=True", id="no-lora"),
        pytest.param(
            {"use_lora": True, "train_language_model": True}, "train the LLM or the base encoder", id="full-llm"
        ),
    ],
)
def test_quantized_model_trains_only_as_qlora(folder, rows, tmp_path, options, message):
    from modeling_mowe.training import make_sft_trainer

    model = MoWEForConditionalGeneration.from_pretrained(folder, quantization_config=four_bit())
    with pytest.raises(ValueError, match=message):
        make_sft_trainer(model, tiny_processor(dynamic_audio_length=True), sft_args(tmp_path), rows, **options)


def test_published_4bit_folder_records_the_quantization(folder, tmp_path):
    from modeling_mowe.publishing import build_hub_folder

    model = MoWEForConditionalGeneration.from_pretrained(folder, quantization_config=four_bit())
    output = build_hub_folder(model, tiny_processor(dynamic_audio_length=True), tmp_path / "hub")
    card = (output / "README.md").read_text()
    assert "## Quantization" in card and "bitsandbytes` (4-bit fp4" in card  # BitsAndBytesConfig's default type
    assert "Quantized: LLM;" in card
    assert "- 4-bit" in card and "- bitsandbytes" in card  # tags
    assert "bitsandbytes>=0.46" in (output / "requirements.txt").read_text()

    processor = tiny_processor(dynamic_audio_length=True)
    plain = build_hub_folder(MoWEForConditionalGeneration.from_pretrained(folder), processor, tmp_path / "plain")
    assert "## Quantization" not in (plain / "README.md").read_text()
    assert "bitsandbytes" not in (plain / "requirements.txt").read_text()

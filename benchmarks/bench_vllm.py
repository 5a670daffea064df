"""vLLM vs batched transformers `generate()` on one MoWE folder: requests/s and generated tokens/s, ratios of one run.

    .venv/bin/python benchmarks/bench_vllm.py [--model FOLDER] [--requests 64] [--warmup 16] [--max-new-tokens 32]
                                              [--hf-batch-size 16] [--llm-layers 2] [--llm-width 64]

`FOLDER` is any MoWE folder (e.g. the demo's `outputs/demo/mowe-model`); without it a random MoWE of the tiny
preset's audio tower is built, with a Llama of `--llm-layers` x `--llm-width` (head size 32 or more: vLLM's CPU
attention needs one of its sizes). `--requests` chat requests, each one 1-3 s clip (a tone under noise, its length
drawn uniformly) and "Transcribe the audio.", greedy, at most `--max-new-tokens` tokens. Each side first answers
`--warmup` other requests (other clips), untimed: the first calls of either pay one-time costs (oneDNN kernel set-up
for new shapes, allocator growth) that a running server or a warm process has already paid; their times are printed.

- vLLM: one `LLM.generate` call with every request (continuous batching), in `.venv-vllm` (`bash scripts/setup.sh
  serve`), fp32, eager (no torch.compile); the engine start is reported apart and not counted.
- transformers: `generate()` on batches of `--hf-batch-size` requests, left-padded, fp32, this process.

Both time wall clock (vLLM's engine runs in other processes). Generated tokens count up to and including the first
end-of-sequence token. The goal in issue 20 is vLLM >= 3x transformers in requests/s on the demo checkpoint on CPU.
Both sides use all cores, so run it on a quiet machine: on a shared one, load moves both and the ratio with it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from timing import print_ratio_table
from vllm_compare import SAMPLING_RATE, build_serving_test_folder, mowe_messages, run_vllm

from modeling_mowe import MoWEForConditionalGeneration, MoWEProcessor

QUESTION = "Transcribe the audio."


def make_clips(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(count):
        t = np.arange(int(rng.uniform(1.0, 3.0) * SAMPLING_RATE)) / SAMPLING_RATE
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 900) * t)
        clips.append((tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32))
    return clips


def generated_length(tokens: list[int], eos: set[int]) -> int:
    """Tokens generated up to and including the first end-of-sequence token (the rest is padding)."""
    for i, token in enumerate(tokens):
        if token in eos:
            return i + 1
    return len(tokens)


def hf_generate(
    folder: Path,
    prompt: str,
    clips: list[np.ndarray],
    batch_size: int,
    max_new_tokens: int,
    warmup: list[np.ndarray] = (),
) -> tuple[list[list[int]], float, float, float]:
    """Greedy answers of `generate()` on batches of `batch_size`, after answering `warmup` untimed.

    Returns (token lists, wall seconds, warm-up wall seconds, audio seconds): the last is the audio part alone on the
    same batches (processor, audio tower and projector, no LLM), timed after the answers. A server that runs the same
    tower on the same cores cannot beat `generate()` by more than wall / audio seconds.
    """
    model = MoWEForConditionalGeneration.from_pretrained(folder).eval()
    processor = MoWEProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])

    def batches(clips):
        for first in range(0, len(clips), batch_size):
            batch = clips[first : first + batch_size]
            yield processor(text=[prompt] * len(batch), audio=batch, sampling_rate=SAMPLING_RATE, return_tensors="pt")

    def answer(clips):
        answers = []
        for inputs in batches(clips):
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            for row in out[:, inputs["input_ids"].shape[1] :].tolist():
                answers.append(row[: generated_length(row, eos)])
        return answers

    start = time.perf_counter()
    answer(list(warmup))
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    answers = answer(clips)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    for inputs in batches(clips):
        with torch.no_grad():
            model.get_audio_features(inputs["input_features"], inputs.get("input_values"), inputs["audio_lengths"])
    return answers, seconds, warmup_seconds, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a MoWE folder (default: a random one built here)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=16, help="untimed requests on other clips, each side first")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--llm-layers", type=int, default=2, help="random folder only")
    parser.add_argument("--llm-width", type=int, default=64, help="random folder only (head size 32)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            folder = build_serving_test_folder(
                Path(tmp) / "mowe",
                text_overrides={
                    "num_hidden_layers": args.llm_layers,
                    "hidden_size": args.llm_width,
                    "intermediate_size": 4 * args.llm_width,
                    "num_attention_heads": args.llm_width // 32,
                    "num_key_value_heads": args.llm_width // 32,
                },
            )
        processor = MoWEProcessor.from_pretrained(folder)
        prompt = processor.apply_chat_template(mowe_messages(QUESTION, 1), add_generation_prompt=True)
        clips, warmup_clips = make_clips(args.requests), make_clips(args.warmup, seed=1)

        def requests(clips, name):
            return [
                {"id": f"{name}{i}", "prompt": prompt, "clips": [clip], "max_tokens": args.max_new_tokens}
                for i, clip in enumerate(clips)
            ]

        served = run_vllm(
            folder, requests(clips, ""), Path(tmp) / "vllm", timeout=1800, warmup=requests(warmup_clips, "warmup")
        )
        vllm_answers = [served["results"][str(i)]["token_ids"] for i in range(len(clips))]
        hf_answers, hf_seconds, hf_warmup_seconds, hf_audio_seconds = hf_generate(
            folder, prompt, clips, args.hf_batch_size, args.max_new_tokens, warmup=warmup_clips
        )

    vllm_seconds = served["generate_seconds"]
    vllm_tokens, hf_tokens = sum(map(len, vllm_answers)), sum(map(len, hf_answers))
    same = sum(a == b for a, b in zip(vllm_answers, hf_answers))
    print(f"model: {args.model or f'random MoWE, tiny audio tower, Llama {args.llm_layers} x {args.llm_width}'}")
    print(
        f"{args.requests} requests of 1-3 s clips, greedy, <= {args.max_new_tokens} new tokens; "
        f"threads: torch {torch.get_num_threads()}"
    )
    print(f"vLLM engine start (not counted): {served['engine_seconds']:.1f} s")
    print(
        f"warm-up, {args.warmup} other requests (not counted): vLLM {served.get('warmup_seconds', 0.0):.2f} s, "
        f"transformers {hf_warmup_seconds:.2f} s"
    )
    print(
        f"vLLM:         {vllm_seconds:7.2f} s  {args.requests / vllm_seconds:7.2f} requests/s  "
        f"{vllm_tokens / vllm_seconds:8.1f} tokens/s ({vllm_tokens} tokens)"
    )
    print(
        f"transformers: {hf_seconds:7.2f} s  {args.requests / hf_seconds:7.2f} requests/s  "
        f"{hf_tokens / hf_seconds:8.1f} tokens/s ({hf_tokens} tokens, batches of {args.hf_batch_size})"
    )
    print(
        f"transformers, the audio part alone (processor + tower + projector on the same batches): "
        f"{hf_audio_seconds:.2f} s = {hf_audio_seconds / hf_seconds:.0%} of generate()"
    )
    print(f"same greedy answer: {same} of {args.requests}")
    print_ratio_table(
        [
            ("requests/s vLLM / HF", hf_seconds / vllm_seconds, ">= 3", hf_seconds / vllm_seconds >= 3, "wall clock"),
            (
                "bound for a server running the same tower: HF / HF audio part",
                hf_seconds / hf_audio_seconds,
                "-",
                None,
                "wall clock",
            ),
            (
                "tokens/s vLLM / HF",
                (vllm_tokens / vllm_seconds) / (hf_tokens / hf_seconds),
                "-",
                None,
                "generated tokens",
            ),
        ],
        header="\nvLLM vs transformers generate()",
    )


if __name__ == "__main__":
    main()

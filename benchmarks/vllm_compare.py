"""vLLM against transformers' `generate()` on the same MoWE folder: the tests' and the benchmark's common parts.

vLLM pins its own torch and transformers, so it runs in its own environment (`.venv-vllm`, made by
`bash scripts/setup.sh serve`); this module is imported on both sides:

- in the project's environment: [`build_serving_test_folder`] (a tiny MoWE whose LLM head size vLLM's CPU attention
  supports), [`hf_greedy`] (the reference tokens and top log-probabilities), [`check_logprobs_close`] (vLLM's own
  rule for comparing two greedy runs), [`run_vllm`] (starts the vLLM side and reads its answers);
- in `.venv-vllm`: `python benchmarks/vllm_compare.py JOB.json OUT.json` starts one `vllm.LLM`, runs every
  request of the job (one batched `LLM.generate`, one batched `LLM.chat`) and writes tokens, log-probabilities and
  timings.

A proof helper: only tests and benchmarks import it.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from modeling_mowe.encoders import SAMPLING_RATE

# The engine settings the tests use: fp32 like `from_pretrained`, no torch.compile (minutes on CPU), and a CPU
# memory share that leaves room for other processes (on CPU, vLLM reserves this fraction of RAM for its KV cache).
# The context length is the LLM's own (`max_position_embeddings`: 1024 for the demo's LLM).
TEST_ENGINE_KWARGS = {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.1}
VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


def build_serving_test_folder(path: str | os.PathLike, seed: int = 0, text_overrides: dict | None = None) -> Path:
    """Save a tiny random MoWE (the `mowe-tiny-random` preset, 4 weak encoders, both routers) that vLLM can serve.

    The preset's LLM has head size 16, which vLLM's CPU attention does not support; this one has 2 heads of 32
    (`text_overrides` sets other `text_config` fields, e.g. a wider or deeper LLM for the benchmark). Its weights are
    drawn with a wide `initializer_range` so that greedy choices are not near-ties. Returns `path`.
    """
    import torch

    from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration, MoWEProcessor

    preset = Path(__file__).resolve().parents[1] / "hub_configs" / "mowe-tiny-random"
    config = MoWEConfig.from_pretrained(preset)
    text = config.text_config
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 2, 1, 32
    text.initializer_range = 0.5
    for key, value in (text_overrides or {}).items():
        setattr(text, key, value)
    torch.manual_seed(seed)
    model = MoWEForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    MoWEProcessor.from_pretrained(preset).save_pretrained(path)
    return Path(path)


def wav_base64(clip: np.ndarray, sampling_rate: int = SAMPLING_RATE) -> str:
    """A float clip as a base64 float32 WAV file: what an OpenAI `input_audio` part carries, losslessly."""
    from modeling_mowe.data import to_wav_bytes

    return base64.b64encode(to_wav_bytes(clip, sampling_rate, subtype="FLOAT")).decode()


def openai_messages(question: str, clips: list[np.ndarray], sampling_rate: int = SAMPLING_RATE) -> list[dict]:
    """One user turn in the OpenAI chat format: each clip as an `input_audio` part (base64 WAV), then the question."""
    parts = [
        {"type": "input_audio", "input_audio": {"data": wav_base64(c, sampling_rate), "format": "wav"}} for c in clips
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


def mowe_messages(question: str, num_clips: int) -> list[dict]:
    """The same turn in MoWE's chat format (`{"type": "audio"}` parts take the clips of `audio=` in order)."""
    return [{"role": "user", "content": [*([{"type": "audio"}] * num_clips), {"type": "text", "text": question}]}]


def hf_greedy(
    model, processor, prompt: str | list[dict], clips: list[np.ndarray], max_new_tokens: int, top_logprobs: int = 5
) -> dict[str, Any]:
    """transformers' greedy answer to one request, as [`run_vllm`] reports vLLM's.

    Args:
        prompt: a prompt string (tokenised as vLLM's `LLM.generate` does, special tokens added) or MoWE chat
            messages (rendered and tokenised as `LLM.chat` does).
        clips: 16 kHz mono clips, one per `<|audio|>` / audio part.

    Returns:
        `{"token_ids": [...], "logprobs": [[[token_id, logprob], ...] per step], "text": ...}`, the top
        `top_logprobs` log-probabilities of the raw logits at each step.
    """
    import torch

    audio = {"audio": clips, "sampling_rate": SAMPLING_RATE} if clips else {}
    if isinstance(prompt, str):
        inputs = processor(text=prompt, return_tensors="pt", **audio)
    else:
        inputs = processor.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **audio
        )
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    logprobs = []
    for logits in out.logits:
        values, ids = logits[0].float().log_softmax(-1).topk(top_logprobs)
        logprobs.append([[int(i), float(v)] for i, v in zip(ids, values)])
    text = processor.tokenizer.decode(tokens, skip_special_tokens=True)
    return {"token_ids": tokens, "logprobs": logprobs, "text": text}


def check_logprobs_close(reference: dict, tested: dict, name: str = "") -> int:
    """vLLM's rule for two greedy runs (`tests/models/utils.py::check_logprobs_close`): tokens agree until the first
    step where they differ, and there each run's token is among the other's top log-probabilities; after that the
    sequences may go apart. Also checks that the agreed tokens' log-probabilities match to 1e-3. Returns how many
    steps it compared (the divergence step included), so a caller can see that the runs were not empty."""
    compared = 0
    for step, (ref_token, test_token) in enumerate(zip(reference["token_ids"], tested["token_ids"])):
        compared = step + 1
        ref_top, test_top = dict(map(tuple, reference["logprobs"][step])), dict(map(tuple, tested["logprobs"][step]))
        if ref_token == test_token:
            if abs(ref_top[ref_token] - test_top[test_token]) > 1e-3:
                raise AssertionError(
                    f"{name} step {step}: token {ref_token} has log-probability {ref_top[ref_token]:.5f} in "
                    f"transformers and {test_top[test_token]:.5f} in vLLM"
                )
            continue
        if ref_token not in test_top or test_token not in ref_top:
            raise AssertionError(
                f"{name} step {step}: transformers chose {ref_token} (top {ref_top}), vLLM {test_token} "
                f"(top {test_top}); each must be in the other's top log-probabilities"
            )
        return compared
    return compared


def run_vllm(
    model: str | os.PathLike,
    requests: list[dict],
    work_dir: str | os.PathLike,
    engine_kwargs: dict | None = None,
    timeout: float = 600,
    python: str | os.PathLike = VLLM_PYTHON,
    warmup: list[dict] | None = None,
) -> dict[str, Any]:
    """Run `requests` through one `vllm.LLM(model, trust_remote_code=True)` in `python` (`.venv-vllm`).

    Each request is `{"id", "max_tokens", "logprobs"}` plus either `"prompt"` (a string) and `"clips"` (16 kHz
    arrays, one per `<|audio|>`) for `LLM.generate`, or `"messages"` (OpenAI chat format) for `LLM.chat`. Returns
    `{"results": {id: {"token_ids", "logprobs", "text"}}, "engine_seconds", "generate_seconds", "chat_seconds"}`.
    `warmup` prompt requests (ids of their own) run first, untimed and not returned, with `"warmup_seconds"`: the
    engine's first calls pay one-time costs (kernel set-up for new shapes) that a running server has paid already.
    Raises `RuntimeError` with the end of vLLM's log when it fails or runs past `timeout` seconds.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for request in [*(dict(r, warmup=True) for r in warmup or []), *requests]:
        job = {k: v for k, v in request.items() if k != "clips"}
        if request.get("clips"):
            paths = []
            for i, clip in enumerate(request["clips"]):
                paths.append(str(work_dir / f"{request['id']}-{i}.npy"))
                np.save(paths[-1], np.asarray(clip, dtype=np.float32))
            job["clips"] = paths
        jobs.append(job)
    job_file, out_file, log_file = work_dir / "job.json", work_dir / "out.json", work_dir / "vllm.log"
    job = {"model": str(model), "engine_kwargs": {**TEST_ENGINE_KWARGS, **(engine_kwargs or {})}, "requests": jobs}
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_file, "w") as log:
        try:
            done = subprocess.run(
                [str(python), str(Path(__file__).resolve()), str(job_file), str(out_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=Path(__file__).resolve().parents[1],
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"vLLM ran past {timeout} s; its log ends:\n{_tail(log_file)}") from None
    if done.returncode != 0 or not out_file.is_file():
        raise RuntimeError(f"vLLM exited with code {done.returncode}; its log ends:\n{_tail(log_file)}")
    return json.loads(out_file.read_text())


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _vllm_main(job_file: str, out_file: str) -> None:
    """The vLLM side of [`run_vllm`]: runs in `.venv-vllm`."""
    from vllm import LLM, SamplingParams

    job = json.loads(Path(job_file).read_text())
    start = time.perf_counter()
    llm = LLM(model=job["model"], trust_remote_code=True, **job["engine_kwargs"])
    engine_seconds = time.perf_counter() - start

    def params(request):
        return SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], logprobs=request.get("logprobs"))

    def answer(output):
        completion = output.outputs[0]
        logprobs = [
            [[int(token), float(lp.logprob)] for token, lp in step.items()] for step in (completion.logprobs or [])
        ]
        return {"token_ids": list(completion.token_ids), "logprobs": logprobs, "text": completion.text}

    def prompt_inputs(requests):
        return [
            {
                "prompt": r["prompt"],
                **(
                    {"multi_modal_data": {"audio": [(np.load(p), SAMPLING_RATE) for p in r["clips"]]}}
                    if r.get("clips")
                    else {}
                ),
            }
            for r in requests
        ]

    results, seconds = {}, {}
    warmup = [r for r in job["requests"] if r.get("warmup")]
    prompts = [r for r in job["requests"] if "prompt" in r and not r.get("warmup")]
    chats = [r for r in job["requests"] if "messages" in r]
    if warmup:
        start = time.perf_counter()
        llm.generate(prompt_inputs(warmup), [params(r) for r in warmup], use_tqdm=False)
        seconds["warmup_seconds"] = time.perf_counter() - start
    if prompts:
        inputs = prompt_inputs(prompts)
        start = time.perf_counter()
        outputs = llm.generate(inputs, [params(r) for r in prompts], use_tqdm=False)
        seconds["generate_seconds"] = time.perf_counter() - start
        results.update({r["id"]: answer(o) for r, o in zip(prompts, outputs)})
    if chats:
        start = time.perf_counter()
        outputs = llm.chat([r["messages"] for r in chats], [params(r) for r in chats], use_tqdm=False)
        seconds["chat_seconds"] = time.perf_counter() - start
        results.update({r["id"]: answer(o) for r, o in zip(chats, outputs)})
    Path(out_file).write_text(json.dumps({"results": results, "engine_seconds": engine_seconds, **seconds}))


if __name__ == "__main__":
    _vllm_main(*sys.argv[1:3])

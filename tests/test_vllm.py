"""Serving with vLLM: a MoWE folder served by `vllm.LLM` and by vLLM's OpenAI server answers as `generate()` does,
and the server answers a client's audio mistakes with 400, not 500.

vLLM runs in its own environment (`.venv-vllm`, made by `bash scripts/setup.sh serve`), in a subprocess started once
per test session for the offline engine and once for the server. The folder is a tiny random MoWE (4 weak encoders,
both routers) unless `MOWE_VLLM_TEST_MODEL` names another (e.g. the demo's `outputs/demo/mowe-model`); with
`MOWE_VLLM_TEST_BENCHMARK` (a benchmark folder `build_benchmark` saved) its first test clips of each task are
compared too.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from vllm_compare import (
    SAMPLING_RATE,
    TEST_ENGINE_KWARGS,
    VLLM_PYTHON,
    build_serving_test_folder,
    check_logprobs_close,
    hf_greedy,
    mowe_messages,
    openai_messages,
    run_vllm,
)

needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason=".venv-vllm is absent: `bash scripts/setup.sh serve` creates it"
)

MAX_TOKENS = 12
TOP_LOGPROBS = 5
CLIPS_PER_TASK = 4


def clip(seconds: float, seed: int) -> np.ndarray:
    """A 16 kHz float32 clip: a tone whose pitch depends on `seed`, under noise."""
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    tone = 0.3 * np.sin(2 * np.pi * (200 + 70 * seed) * t)
    return (tone + 0.05 * np.random.default_rng(seed).standard_normal(t.size)).astype(np.float32)


def prompt_text(processor, question: str, num_clips: int) -> str:
    return processor.apply_chat_template(mowe_messages(question, num_clips), add_generation_prompt=True)


@pytest.fixture(scope="session")
def serving_folder(tmp_path_factory) -> Path:
    if os.environ.get("MOWE_VLLM_TEST_MODEL"):
        return Path(os.environ["MOWE_VLLM_TEST_MODEL"])
    return build_serving_test_folder(tmp_path_factory.mktemp("serving") / "tiny-mowe")


@pytest.fixture(scope="session")
def hf_model(serving_folder):
    from modeling_mowe import MoWEForConditionalGeneration, MoWEProcessor

    model = MoWEForConditionalGeneration.from_pretrained(serving_folder).eval()
    return model, MoWEProcessor.from_pretrained(serving_folder)


def benchmark_cases() -> dict[str, tuple[str, list[np.ndarray]]]:
    """`CLIPS_PER_TASK` held-out clips of each task from `MOWE_VLLM_TEST_BENCHMARK`, as chat cases."""
    if not os.environ.get("MOWE_VLLM_TEST_BENCHMARK"):
        return {}
    import datasets

    from modeling_mowe.data import load_audio
    from modeling_mowe.feature_extraction_mowe import to_mono_waveform

    test = datasets.load_from_disk(os.environ["MOWE_VLLM_TEST_BENCHMARK"])["test"]
    cases, taken = {}, {}
    for row in test:
        if taken.get(row["task"], 0) < CLIPS_PER_TASK:
            taken[row["task"]] = taken.get(row["task"], 0) + 1
            wave, rate = load_audio(row["audio"])
            cases[f"{row['task']}-{row['id']}"] = (row["prompt"], [to_mono_waveform(wave, rate, SAMPLING_RATE)])
    return cases


@pytest.fixture(scope="session")
def cases(hf_model) -> dict[str, dict]:
    """Each case: how vLLM is asked (`request`) and what transformers answers (`reference`)."""
    model, processor = hf_model
    prompts = {
        "one-clip": ("Transcribe the audio.", [clip(2.0, 0)]),
        "short-clip": ("How many beeps do you hear?", [clip(0.7, 1)]),
        "long-clip-35s": ("Transcribe the audio.", [clip(35.0, 2)]),
        "two-clips": ("Which clip is louder?", [clip(1.5, 3), clip(2.5, 4)]),
        "text-only": ("Say something.", []),
    }
    chats = {"chat-one-clip": ("Is the speaker male or female?", [clip(1.2, 5)]), **benchmark_cases()}
    out = {}
    for name, (question, clips) in prompts.items():
        prompt = prompt_text(processor, question, len(clips))
        out[name] = {
            "request": {"prompt": prompt, "clips": clips},
            "reference": hf_greedy(model, processor, prompt, clips, MAX_TOKENS, TOP_LOGPROBS),
        }
    for name, (question, clips) in chats.items():
        out[name] = {
            "request": {"messages": openai_messages(question, clips)},
            "reference": hf_greedy(
                model, processor, mowe_messages(question, len(clips)), clips, MAX_TOKENS, TOP_LOGPROBS
            ),
        }
    return out


@pytest.fixture(scope="session")
def vllm_answers(serving_folder, cases, tmp_path_factory) -> dict:
    requests = [
        {"id": name, "max_tokens": MAX_TOKENS, "logprobs": TOP_LOGPROBS, **case["request"]}
        for name, case in cases.items()
    ]
    return run_vllm(serving_folder, requests, tmp_path_factory.mktemp("vllm-offline"), timeout=480)["results"]


OFFLINE_CASES = ["one-clip", "short-clip", "long-clip-35s", "two-clips", "text-only", "chat-one-clip"]


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("name", OFFLINE_CASES)
def test_vllm_greedy_tokens_equal_generate(name, cases, vllm_answers):
    assert vllm_answers[name]["token_ids"] == cases[name]["reference"]["token_ids"]


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("name", OFFLINE_CASES)
def test_vllm_logprobs_close_to_generate(name, cases, vllm_answers):
    assert check_logprobs_close(cases[name]["reference"], vllm_answers[name], name) >= 1


@pytest.mark.slow
@needs_vllm
def test_vllm_matches_generate_on_benchmark_clips(cases, vllm_answers):
    names = [n for n in cases if n not in OFFLINE_CASES]
    if not names:
        pytest.skip("MOWE_VLLM_TEST_BENCHMARK is not set (a benchmark folder, e.g. the demo's test split)")
    for name in names:
        check_logprobs_close(cases[name]["reference"], vllm_answers[name], name)
    equal = [n for n in names if vllm_answers[n]["token_ids"] == cases[n]["reference"]["token_ids"]]
    assert equal == names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def openai_server(serving_folder, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 serving the folder; stopped after the session."""
    import urllib.request

    port = free_port()
    engine = TEST_ENGINE_KWARGS
    command = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(serving_folder),
        "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port), "--dtype", engine["dtype"],
        "--enforce-eager",
        "--gpu-memory-utilization", str(engine["gpu_memory_utilization"]),
    ]  # fmt: skip
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
                pytest.fail(f"the vLLM server did not start (exit code {server.poll()}); its log ends:\n{tail}")
            time.sleep(2)
        yield base_url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


@pytest.mark.slow
@needs_vllm
def test_openai_server_answers_audio_question_as_generate(openai_server, serving_folder, hf_model):
    """Both OpenAI audio parts: `input_audio` (base64 wav) and `audio_url` (a data: URL)."""
    from openai import OpenAI

    model, processor = hf_model
    clips = [clip(1.8, 6)]
    question = "Transcribe the audio."
    reference = hf_greedy(model, processor, mowe_messages(question, 1), clips, MAX_TOKENS, TOP_LOGPROBS)
    client = OpenAI(base_url=f"{openai_server}/v1", api_key="EMPTY", timeout=120, max_retries=0)
    input_audio = openai_messages(question, clips)
    audio_url = openai_messages(question, clips)
    part = audio_url[0]["content"][0]
    audio_url[0]["content"][0] = {
        "type": "audio_url",
        "audio_url": {"url": f"data:audio/wav;base64,{part['input_audio']['data']}"},
    }
    for messages in (input_audio, audio_url):
        response = client.chat.completions.create(
            model=str(serving_folder), messages=messages, temperature=0, max_tokens=MAX_TOKENS
        )
        assert response.choices[0].message.content == reference["text"]


def post_chat(base_url: str, model: str, content: list[dict]) -> tuple[int, dict]:
    """POST one user turn to the server's chat completions; the HTTP status and the JSON body, error or not."""
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": content}]})
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("mistake", ["base64_that_is_not_audio", "local_file_the_server_may_not_read"])
def test_openai_server_answers_bad_audio_with_400_saying_what_is_wrong(
    openai_server, serving_folder, tmp_path, mistake
):
    import base64

    import soundfile

    if mistake == "base64_that_is_not_audio":
        data = base64.b64encode(b"plain text, not a sound file " * 64).decode()
        part = {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
        expected = r"^The audio could not be decoded .*Send a WAV"
    else:  # the server was started without --allowed-local-media-path
        path = tmp_path / "clip.wav"
        soundfile.write(path, clip(1.0, 2), SAMPLING_RATE)
        part = {"type": "audio_url", "audio_url": {"url": path.as_uri()}}
        expected = r"does not read local files.*--allowed-local-media-path"
    status, body = post_chat(openai_server, str(serving_folder), [part, {"type": "text", "text": "What is it?"}])
    assert status == 400, body
    assert re.search(expected, body["error"]["message"]), body


def test_serving_docs_give_each_presets_longest_clip():
    """docs/SERVING.md's table: each preset's LLM context, and a clip length whose prompt (with 20 text tokens and 64
    new ones) fits in it while one 5 s longer does not, counted with the processor's own token arithmetic."""
    from modeling_mowe import MoWEConfig, MoWEProcessor

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "SERVING.md").read_text()
    tokens = MoWEProcessor.from_pretrained(root / "hub_configs" / "mowe-tiny-random").num_audio_tokens
    rows = re.findall(r"^\| (`mowe-[^|]+) \| ([\d,]+) \| (\d+) min(?: (\d+) s)?", text, re.M)
    presets = {name for row in rows for name in re.findall(r"`(mowe-[\w.-]+)`", row[0])}
    assert presets == {path.name for path in (root / "hub_configs").iterdir()}
    for names, context, minutes, seconds in rows:
        length = 60 * int(minutes) + int(seconds or 0)
        for name in re.findall(r"`(mowe-[\w.-]+)`", names):
            config = MoWEConfig.from_pretrained(root / "hub_configs" / name)
            assert config.text_config.max_position_embeddings == int(context.replace(",", "")), name
            assert config.stack_factor == 4 and config.audio_frame_spec.samples_per_frame == 320, name
            assert tokens(length * SAMPLING_RATE) + 84 <= int(context.replace(",", "")), name
            assert tokens((length + 5) * SAMPLING_RATE) + 84 > int(context.replace(",", "")), name


def run(tokens: list[int], top: list[dict[int, float]]) -> dict:
    return {"token_ids": tokens, "logprobs": [[[t, lp] for t, lp in step.items()] for step in top]}


def test_logprobs_close_accepts_a_divergence_inside_both_top_lists():
    reference = run([5, 7, 1], [{5: -0.1, 6: -2.0}, {7: -0.50, 8: -0.52}, {1: -0.1}])
    tested = run([5, 8, 2], [{5: -0.1, 6: -2.0}, {8: -0.50, 7: -0.51}, {2: -0.1}])
    assert check_logprobs_close(reference, tested) == 2  # tokens after the divergence are not compared


def test_logprobs_close_rejects_a_token_outside_the_other_top_list():
    reference = run([5, 7], [{5: -0.1, 6: -2.0}, {7: -0.1, 8: -3.0}])
    tested = run([5, 9], [{5: -0.1, 6: -2.0}, {9: -0.1, 7: -3.0}])
    with pytest.raises(AssertionError, match="step 1"):
        check_logprobs_close(reference, tested)


def test_logprobs_close_rejects_equal_tokens_with_different_logprobs():
    reference = run([5], [{5: -0.10, 6: -2.0}])
    tested = run([5], [{5: -0.20, 6: -2.0}])
    with pytest.raises(AssertionError, match="log-probability"):
        check_logprobs_close(reference, tested)

"""The Gradio Space demo: its metadata, its answer function, and the app answering in a real (headless) browser."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from conftest import SR, TINY, greedy_answer, make_clip, tiny_processor
from huggingface_hub import SpaceCard
from packaging.requirements import Requirement
from packaging.version import Version

from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration
from modeling_mowe.publishing import build_hub_folder

SPACE = Path(__file__).resolve().parents[1] / "examples" / "space"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HAS_PLAYWRIGHT = importlib.util.find_spec("playwright") is not None
HAS_GRADIO = importlib.util.find_spec("gradio") is not None
QUESTION = "Is the speaker male or female?"
MAX_NEW_TOKENS = 64  # the app's default


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny model with an untied LM head (its greedy answers are visible text), published as a Hub folder."""
    root = tmp_path_factory.mktemp("space")
    config = MoWEConfig.from_pretrained(TINY, dynamic_audio_length=True, tie_word_embeddings=False)
    config.text_config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = MoWEForConditionalGeneration(config).eval()
    processor = tiny_processor(dynamic_audio_length=True)
    folder = build_hub_folder(model, processor, root / "mowe-space-model")
    return {"root": root, "folder": folder, "model": model, "processor": processor}


def test_space_metadata_and_requirements():
    card = SpaceCard.load(SPACE / "README.md")
    assert card.data.sdk == "gradio" and (SPACE / card.data.app_file).is_file()
    assert Requirement("gradio>=5.0,<7").specifier.contains(Version(card.data.sdk_version))
    assert card.data.title and card.data.license == "apache-2.0"
    requirements = {
        Requirement(line).name
        for line in (SPACE / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"torch", "transformers", "soundfile", "soxr", "numpy"} <= requirements
    assert "gradio" not in requirements  # a Space installs the gradio of `sdk_version`


def test_app_answers_gradio_audio_and_rejects_missing_input(published):
    gr = pytest.importorskip("gradio", reason="gradio is not installed (scripts/setup.sh installs .[dev])")
    spec = importlib.util.spec_from_file_location("mowe_space_app", SPACE / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    demo = app.MoWEDemo(str(published["folder"]), device="cpu")

    stereo = (np.stack([make_clip(1.0, seed=1, kind="sine"), make_clip(1.0, seed=2)], axis=1)[::2] * 32767)
    stereo = stereo.astype(np.int16)  # what gr.Audio(type="numpy") hands over: (samples, channels) int16
    expected = greedy_answer(published["model"], published["processor"], stereo, QUESTION, 8000, MAX_NEW_TOKENS)
    assert demo.answer((8000, stereo), QUESTION, MAX_NEW_TOKENS) == expected and expected
    with pytest.raises(gr.Error, match="Record or upload"):
        demo.answer(None, QUESTION)
    with pytest.raises(gr.Error, match="Type a question"):
        demo.answer((8000, stereo), "  ")
    with pytest.raises(gr.Error, match="[Ee]mpty"):
        demo.answer((8000, np.zeros(0, dtype=np.int16)), QUESTION)
    assert app.model_example(str(published["folder"])) == (
        str(published["folder"] / "example.wav"),
        "How many beeps do you hear?",
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def space_server(published):
    """The Space app serving the published model on a free local port; stopped after the test."""
    port = free_port()
    log = (published["root"] / "app.log").open("w")
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(published["root"] / "modules_cache"),
    }
    process = subprocess.Popen(
        [sys.executable, str(SPACE / "app.py"), "--model", str(published["folder"]), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"the app exited with {process.returncode}:\n{(published['root'] / 'app.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not serve {url} within 90 s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (scripts/setup.sh installs Debian's chromium)")
@pytest.mark.skipif(not HAS_PLAYWRIGHT, reason="playwright is not installed (scripts/setup.sh installs .[dev])")
@pytest.mark.skipif(not HAS_GRADIO, reason="gradio is not installed (scripts/setup.sh installs .[dev])")
def test_space_answers_in_a_real_browser(published, space_server, tmp_path):
    from playwright import sync_api

    clip = make_clip(1.5, seed=4, kind="sine")
    wav = tmp_path / "question.wav"
    soundfile.write(wav, clip, SR, subtype="PCM_16")
    waveform, rate = soundfile.read(wav, dtype="int16")
    expected = greedy_answer(published["model"], published["processor"], waveform, QUESTION, rate, MAX_NEW_TOKENS)
    assert expected, "the fixture model should answer with visible text"

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(space_server, wait_until="domcontentloaded")
            question = page.get_by_label("Question")
            question.wait_for(timeout=60_000)
            page.locator("input[type=file]").first.set_input_files(str(wav))
            page.get_by_role("button", name="Play", exact=True).wait_for(timeout=30_000)  # shown once uploaded
            question.fill(QUESTION)
            page.get_by_role("button", name="Ask").click()
            answer = page.get_by_label("Answer")
            sync_api.expect(answer).not_to_have_value("", timeout=60_000)
            assert answer.input_value() == expected
        except sync_api.Error as err:
            log = (published["root"] / "app.log").read_text()[-3000:]
            pytest.fail(f"{type(err).__name__}: {err}\n--- app log ---\n{log}")
        finally:
            browser.close()

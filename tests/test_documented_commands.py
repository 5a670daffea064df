"""Every command that README.md and the examples' docstrings document runs, exactly as written.

Commands are read from the ```bash blocks of README.md and `examples/**/README.md` and from the docstrings of
`examples/**/*.py`: each line that
starts `python`, `torchrun` or `accelerate` (after optional `VAR=value` settings), with `\\` continuations joined.
They run with bash in a sandbox that looks like the repository after `scripts/demo.sh`: `examples/` and
`hub_configs/` linked in, a tiny benchmark at `outputs/demo/cache/benchmark/<fingerprint>`, a published tiny model at
`outputs/demo/mowe-model` and a `clip.wav`; the venv's `python` first on `PATH`. Only `<fingerprint>` is
substituted. Commands the docs mark "not run by the tests" (GPUs, Hub downloads, runs too long for the suite) are not
run, `bash scripts/*.sh` is the demo (`test_demo.py` runs its pipeline) and the test suite itself, and the commands
in `RUN_ELSEWHERE` run, as written, in the test named there, on the data they need.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import soundfile
import torch
from conftest import SR, TINY, make_clip, tiny_processor

from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration
from modeling_mowe.publishing import build_hub_folder

ROOT = Path(__file__).resolve().parents[1]
NOT_RUN = "not run by the tests"
COMMAND = re.compile(r"^(\w+=\S+\s+)*(python|torchrun|accelerate)\s")
RUN_ELSEWHERE = {
    # "Train on your own data": the sample mixture reads a LibriSpeech-style tree and emotion folders.
    "--mixture examples/mixtures/local.yaml": "tests/test_own_data.py",
}


def commands_in(text: str) -> list[str]:
    """The command lines of a text, continuations joined."""
    lines = re.sub(r"\\\n\s*", "", text).splitlines()
    return [line.strip() for line in lines if COMMAND.match(line.strip())]


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every command in README.md's bash blocks and in the examples' docstrings."""
    found = []
    for readme in [ROOT / "README.md", *sorted((ROOT / "examples").rglob("README.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), re.S):
            found += [(str(readme.relative_to(ROOT)), command) for command in commands_in(block)]
    for script in sorted((ROOT / "examples").rglob("*.py")):
        docstring = ast.get_docstring(ast.parse(script.read_text())) or ""
        found += [(str(script.relative_to(ROOT)), command) for command in commands_in(docstring)]
    return found


def key(command: str) -> str:
    """A command without its trailing comment and with single spaces: the same command documented twice runs once."""
    return " ".join(re.sub(r"\s+#\s.*$", "", command).split())


def runnable(commands: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The commands to run here: each once, in the order documented, without those marked as not run here or run
    elsewhere."""
    unique: dict[str, tuple[str, str]] = {}
    for where, command in commands:
        if NOT_RUN not in command and not any(marker in command for marker in RUN_ELSEWHERE):
            unique.setdefault(key(command), (where, command))
    return list(unique.values())


COMMANDS = documented_commands()
RUNNABLE = runnable(COMMANDS)


def test_docs_document_every_example_and_mark_what_does_not_run_here():
    scripts = {path.relative_to(ROOT).as_posix() for path in (ROOT / "examples").rglob("*.py")}
    run = " ".join(command for _, command in RUNNABLE)
    assert {script for script in scripts if script not in run} == set()
    for _, command in COMMANDS:
        if NOT_RUN in command:
            assert re.search(r"# .*\b(GPU|Hub|too long)\b", command), f"say why it does not run here: {command}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A folder laid out as after the demo, and the environment the commands run in."""
    from modeling_mowe.data import BenchmarkConfig, build_benchmark

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/setup.sh installs it)")
    root = tmp_path_factory.mktemp("documented")
    for name in ("examples", "hub_configs"):
        (root / name).symlink_to(ROOT / name, target_is_directory=True)
    config = BenchmarkConfig.tiny()
    build_benchmark(root / "outputs/demo/cache/benchmark", config, progress=False)
    model_config = MoWEConfig.from_pretrained(TINY, dynamic_audio_length=True, tie_word_embeddings=False)
    model_config.text_config.tie_word_embeddings = False  # greedy answers then come out as visible text
    torch.manual_seed(0)
    build_hub_folder(
        MoWEForConditionalGeneration(model_config).eval(), tiny_processor(dynamic_audio_length=True),
        root / "outputs/demo/mowe-model",
    )
    soundfile.write(root / "clip.wav", make_clip(1.5, seed=5, kind="sine"), SR, subtype="PCM_16")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(root / "modules_cache"),
        "OMP_NUM_THREADS": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    return {"root": root, "env": env, "fingerprint": config.fingerprint()}


def serves(command: str, cwd: Path, env: dict) -> str:
    """Start a server command, wait until it answers HTTP, stop it; returns the page."""
    port = free_port()
    process = subprocess.Popen(
        ["bash", "-c", command], cwd=cwd, env={**env, "GRADIO_SERVER_PORT": str(port)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"{command!r} exited with {process.returncode}:\n{process.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    return response.read().decode()
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"{command!r} did not serve within 120 s")
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


def check_product(command: str, root: Path, stdout: str) -> None:
    """What each example leaves behind when it worked."""
    if "train_sft.py" in command:
        output_dir = root / re.search(r"--output_dir (\S+)", command).group(1)
        assert list(output_dir.glob("*.safetensors")), f"no weights in {output_dir}"
    elif "evaluate_model.py" in command:
        output_dir = root / re.search(r"--output_dir (\S+)", command).group(1)
        results = json.loads((output_dir / "results.json").read_text())
        assert set(next(iter(results.values()))["tasks"]) == {"asr", "gender", "language", "rate", "count"}
    elif "inference.py" in command:
        assert stdout.strip(), "the example should print the model's answer"


@pytest.mark.parametrize(
    "where, command",
    [pytest.param(*c, marks=[pytest.mark.slow] if c[1].startswith("torchrun") else []) for c in RUNNABLE],
    ids=[f"{where}: {command[:60]}" for where, command in RUNNABLE],
)
def test_documented_command_runs_as_written(sandbox, where, command):
    root, env = sandbox["root"], sandbox["env"]
    line = command.replace("<fingerprint>", sandbox["fingerprint"])
    if "examples/space/app.py" in line:
        assert "MoWE audio LLM" in serves(line, root, env)
        return
    result = subprocess.run(["bash", "-c", line], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{where}: {command}\n{result.stderr[-4000:]}"
    check_product(line, root, result.stdout)


def test_train_sft_keeps_fp32_without_bf16_hardware_and_lets_the_user_choose():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train_sft
    finally:
        sys.path.remove(str(ROOT / "examples"))
    argv = ["--dataset", "d", "--output_dir", "o"]
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CPU default is what is tested here")
    assert train_sft.with_default_precision(argv) == [*argv, "--bf16", "False"]
    for chosen in (["--bf16"], ["--bf16", "True"], ["--bf16=False"], ["--fp16", "True"]):
        assert train_sft.with_default_precision(argv + chosen) == argv + chosen

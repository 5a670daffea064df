"""The documentation holds what it promises: every relative link resolves, and the README's quickstart runs.

Commands in bash blocks are run by `test_documented_commands.py`; this file covers the links and the quickstart's
python block, which composes from Hub ids: here tiny checkpoints saved to local folders take their place.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
import torch
from conftest import SR, TINY, make_clip, tiny_whisper

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    {
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "benchmarks").glob("*.md"),
        *(ROOT / "examples").rglob("README.md"),
    }
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation but `-` and `_` dropped, spaces to `-`."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def without_comments_and_code_blocks(text: str) -> str:
    """Markdown without HTML comments and fenced code blocks (where a link or heading is not one)."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def links(text: str) -> list[str]:
    """The targets of the markdown links a reader sees: not in comments, code blocks or inline code."""
    return LINK.findall(re.sub(r"`[^`\n]*`", "", without_comments_and_code_blocks(text)))


def anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#+\s+(.*)$", without_comments_and_code_blocks(path.read_text()), re.M)
    return {github_slug(heading) for heading in headings}


def relative_links(path: Path) -> list[str]:
    targets = links(path.read_text())
    return [target for target in targets if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


@pytest.mark.parametrize("doc", DOCS, ids=[doc.relative_to(ROOT).as_posix() for doc in DOCS])
def test_relative_links_resolve(doc):
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor})")
    assert broken == [], f"{doc.relative_to(ROOT)}: broken links: {broken}"


def test_link_check_sees_links_and_ignores_comments_and_code():
    text = "[a](docs/A.md) `[b](no)` <!-- [c](C.md) -->\n```\n[d](D.md)\n```\n[e](https://x.org/y) [f](#here)"
    assert links(text) == ["docs/A.md", "https://x.org/y", "#here"]
    assert github_slug("Quickstart: compose, train, ask") == "quickstart-compose-train-ask"
    assert github_slug("`dynamic_audio_length` on real Whisper") == "dynamic_audio_length-on-real-whisper"


def readme_quickstart() -> str:
    section = re.search(r"^## Quickstart.*?(?=^## )", (ROOT / "README.md").read_text(), re.S | re.M).group(0)
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory) -> dict[str, Path]:
    """Tiny stand-ins for the quickstart's Hub ids: a 128-mel Whisper, an 80-mel Whisper, a Llama with a tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("quickstart_parts")
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    torch.manual_seed(0)
    parts = {
        "openai/whisper-large-v3": tiny_whisper(128, 32),
        "openai/whisper-tiny": tiny_whisper(80, 16),
        "Qwen/Qwen2.5-0.5B-Instruct": LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ),
    }
    folders = {}
    for hub_id, part in parts.items():
        folders[hub_id] = root / hub_id.replace("/", "--")
        part.save_pretrained(folders[hub_id])
    tokenizer.save_pretrained(folders["Qwen/Qwen2.5-0.5B-Instruct"])
    return folders


def test_readme_quickstart_composes_trains_and_answers(tiny_parts, tmp_path):
    code = readme_quickstart()
    for hub_id, folder in tiny_parts.items():
        assert f'"{hub_id}"' in code, f"the quickstart no longer composes from {hub_id}; update this test"
        code = code.replace(f'"{hub_id}"', repr(str(folder)))
    soundfile.write(tmp_path / "clip.wav", make_clip(1.0, seed=3, kind="sine"), SR, subtype="PCM_16")
    check = (
        "\nimport math\n"
        "losses = [log['loss'] for log in trainer.state.log_history if 'loss' in log]\n"
        "assert trainer.state.global_step == 10 and losses and all(math.isfinite(x) for x in losses), losses\n"
        "assert out.shape[1] > inputs['input_ids'].shape[1], 'generate added no token'\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    result = subprocess.run(
        [sys.executable, "-c", code + check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out/quickstart").is_dir()
    assert result.stdout.endswith("\n"), "the quickstart should print the model's answer"

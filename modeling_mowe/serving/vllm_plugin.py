"""vLLM plugin entry point: registers the native MoWE model with vLLM (docs/SERVING.md).

vLLM calls [`register`] in every engine process through the `vllm.general_plugins` entry point that this package
declares, so `vllm.LLM(model=folder, trust_remote_code=True)` and `python -m vllm.entrypoints.openai.api_server`
serve a MoWE folder (`architectures: ["MoWEForConditionalGeneration"]`) with [`MoWEForConditionalGenerationVLLM`]
from `modeling_mowe.serving.vllm_model`. Tooling wing: nothing in the remote-code files imports this module, and it imports
vLLM only inside [`register`], so it is harmless where vLLM is not installed.
"""

from __future__ import annotations

ARCHITECTURE = "MoWEForConditionalGeneration"
VLLM_MODEL = "modeling_mowe.serving.vllm_model:MoWEForConditionalGenerationVLLM"


def register() -> None:
    """Register MoWE's architecture with vLLM's `ModelRegistry` (lazily: the model module is imported on use)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, VLLM_MODEL)

"""Serving with vLLM: `vllm_plugin` (the `vllm.general_plugins` entry point) registers `vllm_model`, a native
vLLM model that runs MoWE's own audio tower and projector (docs/SERVING.md). Imported only by vLLM and the tests.
"""

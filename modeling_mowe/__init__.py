"""mowe-audio: multi-task audio LLMs with a Mixture of Weak Encoders, as a Hugging Face Transformers plugin."""

import logging

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForMultimodalLM, AutoProcessor

from .configuration_mowe import MoWEConfig
from .encoders import ENCODER_FAMILIES, num_audio_tokens
from .feature_extraction_mowe import MoWEFeatureExtractor
from .modeling_mowe import MoWEForConditionalGeneration, MoWEModel, MoWEPreTrainedModel
from .processing_mowe import MoWEProcessor


class _DropBitsandbytesKernelsWarning(logging.Filter):
    """Drops bitsandbytes' one "Failed to load CPU gemm_4bit_forward from kernels-community" record.

    bitsandbytes (0.50) logs it on import, on CPUs with AVX512-BF16, when the `kernels` package is absent; the `quant`
    extra leaves `kernels` out on purpose (it downloads its kernel from the Hub at run time), and bitsandbytes then
    uses its bundled CPU kernel (docs/QUANTIZATION.md). transformers' Trainer imports PEFT, which imports
    bitsandbytes, so every training command printed it even with nothing quantized. Other records pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# Installed before anything in the package (or a script that imports it first) can import bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropBitsandbytesKernelsWarning())

AutoConfig.register("mowe", MoWEConfig, exist_ok=True)
AutoModel.register(MoWEConfig, MoWEForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(MoWEConfig, MoWEForConditionalGeneration, exist_ok=True)
AutoFeatureExtractor.register(MoWEConfig, MoWEFeatureExtractor, exist_ok=True)
AutoProcessor.register(MoWEConfig, MoWEProcessor, exist_ok=True)
MoWEConfig.register_for_auto_class()  # the model's auto_map: MoWEPreTrainedModel.save_pretrained (AUTO_MAP)
MoWEFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
MoWEProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "ENCODER_FAMILIES",
    "MoWEConfig",
    "MoWEFeatureExtractor",
    "MoWEProcessor",
    "num_audio_tokens",
    "MoWEForConditionalGeneration",
    "MoWEModel",
    "MoWEPreTrainedModel",
]

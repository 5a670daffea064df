"""mowe-audio: multi-task audio LLMs with a Mixture of Weak Encoders, as a Hugging Face Transformers plugin."""

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForMultimodalLM, AutoProcessor

from .configuration_mowe import MoWEConfig
from .encoders import ENCODER_FAMILIES, num_audio_tokens
from .feature_extraction_mowe import MoWEFeatureExtractor
from .modeling_mowe import MoWEForConditionalGeneration, MoWEModel, MoWEPreTrainedModel
from .processing_mowe import MoWEProcessor

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

"""mowe-audio: multi-task audio LLMs with a Mixture of Weak Encoders, as a Hugging Face Transformers plugin."""

from transformers import AutoConfig, AutoModel, AutoModelForMultimodalLM

from .configuration_mowe import MoWEConfig
from .modeling_mowe import MoWEForConditionalGeneration, MoWEModel, MoWEPreTrainedModel

AutoConfig.register("mowe", MoWEConfig, exist_ok=True)
AutoModel.register(MoWEConfig, MoWEForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(MoWEConfig, MoWEForConditionalGeneration, exist_ok=True)
MoWEConfig.register_for_auto_class()
MoWEForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = [
    "MoWEConfig",
    "MoWEForConditionalGeneration",
    "MoWEModel",
    "MoWEPreTrainedModel",
]

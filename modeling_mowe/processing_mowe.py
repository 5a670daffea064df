"""MoWEProcessor: waveforms + text or chat messages -> exactly what MoWEForConditionalGeneration needs."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, BatchFeature
from transformers.processing_utils import ProcessorMixin

from .encoders import n_audio_tokens
from .feature_extraction_mowe import MoWEFeatureExtractor, to_mono_waveform, to_mono_waveforms

AUDIO_TOKEN = "<|audio|>"

# ChatML with `{% generation %}` around assistant turns (for `return_assistant_tokens_mask`); message content is a
# string in which each audio clip stands as one <|audio|> (apply_chat_template flattens content parts to that).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class MoWEProcessor(ProcessorMixin):
    r"""
    Combines a [`MoWEFeatureExtractor`] and the LLM's tokenizer. Each `<|audio|>` placeholder in the text is expanded
    to as many audio tokens as its clip gives (`encoders.n_audio_tokens`, the function the model uses too).

    Args:
        feature_extractor ([`MoWEFeatureExtractor`]): computes the encoders' shared front-ends.
        tokenizer: the LLM's tokenizer, holding `audio_token` as a special token.
        chat_template (`str`, *optional*): Jinja template over messages whose content is a string.
        audio_token (`str`, defaults to `"<|audio|>"`): the placeholder, one per clip.
        frame_spec (`dict`): the base encoder's frame spec (`MoWEConfig.audio_frame_spec`).
        stack_factor (`int`): encoder frames per audio token (`MoWEConfig.stack_factor`).
    """

    feature_extractor_class = "AutoFeatureExtractor"
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        feature_extractor=None,
        tokenizer=None,
        chat_template: str | None = None,
        audio_token: str = AUDIO_TOKEN,
        frame_spec: dict | None = None,
        stack_factor: int = 4,
    ):
        self.audio_token = audio_token
        self.frame_spec = frame_spec if frame_spec is not None else {
            "type": "whisper", "hop_length": 160, "max_frames": 1500, "samples_per_frame": 320
        }
        self.stack_factor = stack_factor
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)

    @property
    def audio_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.audio_token)

    def num_audio_tokens(self, num_samples: int) -> int:
        """Audio tokens a 16 kHz clip of `num_samples` becomes (summed over its windows)."""
        return sum(
            int(n_audio_tokens(length, self.frame_spec, self.stack_factor))
            for length in self.feature_extractor.window_lengths(num_samples)
        )

    def __call__(
        self,
        text: str | list[str] | None = None,
        audio: Any = None,
        sampling_rate: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenise `text`, expanding each `<|audio|>` for the matching clip of `audio` (clips in text order).

        `audio`: one clip or a list (see `to_mono_waveform` for accepted forms); raw arrays need `sampling_rate`.
        Returns `input_ids`, `attention_mask` and the audio inputs (`input_features`, `input_values`,
        `audio_lengths`), ready for `model(**inputs)` and `model.generate(**inputs)`.
        """
        if text is None and audio is None:
            raise ValueError("Give `text` (with one <|audio|> per clip) and/or `audio`.")
        texts = [text] if isinstance(text, str) else text
        if texts is not None and not all(isinstance(t, str) for t in texts):
            raise ValueError("`text` must be a string or a list of strings.")
        clips = [] if audio is None else to_mono_waveforms(audio, sampling_rate, self.feature_extractor.sampling_rate)
        if texts is not None:
            placeholders = sum(t.count(self.audio_token) for t in texts)
            if placeholders != len(clips):
                raise ValueError(
                    f"{len(clips)} audio clip{'s were' if len(clips) != 1 else ' was'} given but the text has "
                    f"{placeholders} {self.audio_token} placeholder{'s' if placeholders != 1 else ''}; put one "
                    f"{self.audio_token} in the text where each clip belongs."
                )
        if texts is None:
            return self.feature_extractor(clips, sampling_rate=self.feature_extractor.sampling_rate, **kwargs)
        return super().__call__(
            text=texts, audio=clips or None, sampling_rate=self.feature_extractor.sampling_rate, **kwargs
        )

    def _process_audio(self, audio: list, **kwargs):
        kwargs.pop("return_tensors", None)
        features = self.feature_extractor(audio, **{k: v for k, v in kwargs.items() if k == "sampling_rate"})
        replacements = [self.audio_token * self.num_audio_tokens(len(clip)) for clip in audio]
        return features, replacements

    def replace_audio_token(self, audio_inputs: dict, audio_idx: int, **kwargs) -> str:
        raise NotImplementedError("MoWEProcessor expands audio placeholders in `_process_audio`.")

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        processor_kwargs: dict | None = None,
        **kwargs,
    ):
        """Render chat `conversation`(s) whose content parts are `{"type": "text", "text": ...}` and
        `{"type": "audio", "audio": array | datasets-Audio dict | path}` or `{"type": "audio", "path": file}`
        (an array part may carry `"sampling_rate"`). Each audio part becomes one `<|audio|>`; with `tokenize=True`
        and `return_dict=True` the result is the processor's `BatchFeature` for the rendered text and its clips.
        Audio parts without data (`{"type": "audio"}`) take the clips given as `audio=` in order.
        """
        processor_kwargs = dict(processor_kwargs or {})
        for key in ("sampling_rate", "audio", "padding", "truncation", "max_length"):
            if key in kwargs:
                processor_kwargs[key] = kwargs.pop(key)
        sampling_rate = processor_kwargs.pop("sampling_rate", None)
        extra_audio = processor_kwargs.pop("audio", None)
        extra_clips = [] if extra_audio is None else to_mono_waveforms(extra_audio, sampling_rate)

        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        flat_conversations, clips = [], []
        for conv in conversations:
            flat = []
            for message in conv:
                message = copy.copy(message)
                if isinstance(message.get("content"), list):
                    pieces = []
                    for part in message["content"]:
                        if part.get("type") == "audio":
                            pieces.append(self.audio_token)
                            clips.append(self._chat_audio(part, sampling_rate, extra_clips))
                        elif part.get("type") == "text":
                            pieces.append(part.get("text", ""))
                        else:
                            raise ValueError(f"Unsupported content part type {part.get('type')!r}; use text or audio.")
                    message["content"] = "".join(pieces)
                flat.append(message)
            flat_conversations.append(flat)
        if extra_clips:
            raise ValueError(f"{len(extra_clips)} audio clip(s) given as `audio=` have no audio part in the chat.")

        rendered = [
            self.tokenizer.apply_chat_template(
                conv,
                chat_template=chat_template or self.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **kwargs,
            )
            for conv in flat_conversations
        ]
        if not tokenize:
            return rendered if batched else rendered[0]
        processor_kwargs.setdefault("add_special_tokens", False)
        if len(rendered) > 1:
            processor_kwargs.setdefault("padding", True)
        outputs = self(
            text=rendered,
            audio=clips or None,
            sampling_rate=self.feature_extractor.sampling_rate,  # the clips were resampled above
            return_tensors=return_tensors,
            **processor_kwargs,
        )
        return outputs if return_dict else outputs["input_ids"]

    def _chat_audio(self, part: dict, sampling_rate: int | None, extra_clips: list) -> Any:
        for key in ("audio", "path", "url"):
            if part.get(key) is not None:
                source = part[key]
                if key == "url" and not os.path.exists(str(source)):
                    raise ValueError(f"Audio url {source!r}: download it first and pass the file path or array.")
                return to_mono_waveform(source, part.get("sampling_rate", sampling_rate))
        if extra_clips:
            return extra_clips.pop(0)
        raise ValueError("An audio content part has no 'audio' or 'path' and no clip was given with `audio=`.")

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", *self.feature_extractor.model_input_names]

    @classmethod
    def from_mowe_config(cls, config, tokenizer, chat_template: str | None = None, **kwargs) -> MoWEProcessor:
        """The processor for a `MoWEConfig` and an LLM tokenizer (which gets `<|audio|>` if it lacks it)."""
        if AUDIO_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO_TOKEN]})
        return cls(
            feature_extractor=MoWEFeatureExtractor.from_mowe_config(config),
            tokenizer=tokenizer,
            chat_template=chat_template or getattr(tokenizer, "chat_template", None),
            frame_spec=config.audio_frame_spec,
            stack_factor=config.stack_factor,
            **kwargs,
        )

    @classmethod
    def from_components(
        cls,
        base_encoder: str | Path,
        weak_encoders: list[str | Path] = (),
        text_model: str | Path | None = None,
        chat_template: str | None = None,
        **config_kwargs,
    ) -> MoWEProcessor:
        """The processor for the model `MoWEForConditionalGeneration.from_components` builds from the same parts:
        front-ends from the encoders' configs, the LLM's tokenizer with `<|audio|>` added as a special token.
        Build the model with `audio_token_id=processor.audio_token_id`."""
        from .configuration_mowe import MoWEConfig

        if text_model is None:
            raise ValueError("from_components needs `text_model` (the LLM whose tokenizer to use).")
        config_kwargs.pop("audio_token_id", None)
        config = MoWEConfig(
            base_encoder_config=AutoConfig.from_pretrained(base_encoder),
            weak_encoder_configs=[AutoConfig.from_pretrained(w) for w in weak_encoders],
            text_config=AutoConfig.from_pretrained(text_model),
            **config_kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(text_model)
        return cls.from_mowe_config(config, tokenizer, chat_template=chat_template)


__all__ = ["MoWEProcessor", "DEFAULT_CHAT_TEMPLATE", "AUDIO_TOKEN"]

"""MoWEProcessor: waveforms + text or chat messages -> exactly what MoWEForConditionalGeneration needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoConfig, AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.processing_utils import AudioKwargs, ProcessorMixin, TextKwargs

from .encoders import n_audio_tokens, whisper_frame_spec
from .feature_extraction_mowe import MoWEFeatureExtractor, _is_single_clip, to_mono_waveform

AUDIO_TOKEN = "<|audio|>"

# ChatML. Content is a string (each clip one <|audio|>) or a list of {"type": "text"|"audio"} parts; assistant turns
# sit in {% generation %} so `return_assistant_tokens_mask` works with the tokenizer.
DEFAULT_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'audio' -%}<|audio|>{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ render(message['content']) + '<|im_end|>' }}{% endgeneration %}"
    "{%- else -%}{{ render(message['content']) + '<|im_end|>' }}{%- endif -%}"
    "{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

_PROCESSOR_KWARGS = (
    set(TextKwargs.__annotations__)
    | set(AudioKwargs.__annotations__)
    | {"audio", "text_kwargs", "audio_kwargs", "common_kwargs"}
)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class MoWEProcessor(ProcessorMixin):
    r"""
    Constructs a MoWE processor from a [`MoWEFeatureExtractor`] and the LLM's tokenizer.

    Each `<|audio|>` placeholder in the text is expanded to as many audio tokens as its clip gives
    (`encoders.n_audio_tokens` summed over the clip's windows: the function the model uses too, so the two never
    disagree). Batched text is padded by default, on the tokenizer's padding side (left for generation).

    Args:
        feature_extractor ([`MoWEFeatureExtractor`]): computes the encoders' shared front-ends.
        tokenizer ([`PreTrainedTokenizerBase`]): the LLM's tokenizer, holding `audio_token` as a special token.
        chat_template (`str`, *optional*): Jinja template; defaults to a ChatML template that renders audio parts.
        audio_token (`str`, defaults to `"<|audio|>"`): the placeholder, one per clip.
        frame_spec (`dict`, *optional*): the base encoder's frame spec (`MoWEConfig.audio_frame_spec`); defaults to
            Whisper's (50 frames/s, 1500 per window).
        stack_factor (`int`, defaults to 4): encoder frames per audio token (`MoWEConfig.stack_factor`).
    """

    text_kwargs = {"padding": True}

    def __init__(
        self,
        feature_extractor: MoWEFeatureExtractor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        audio_token: str = AUDIO_TOKEN,
        frame_spec: dict | None = None,
        stack_factor: int = 4,
    ):
        if tokenizer is not None and audio_token not in tokenizer.get_vocab():
            raise ValueError(
                f"The tokenizer has no {audio_token} token. Add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{audio_token!r}]}}) (and resize the "
                "model's embeddings), or build the processor with MoWEProcessor.from_components."
            )
        self.audio_token = audio_token
        self.frame_spec = dict(frame_spec or whisper_frame_spec())
        self.stack_factor = stack_factor
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)

    @property
    def audio_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.audio_token)

    @property
    def sampling_rate(self) -> int:
        return self.feature_extractor.sampling_rate

    def num_audio_tokens(self, num_samples: int) -> int:
        """Audio tokens a mono clip of `num_samples` samples at `sampling_rate` becomes (summed over its windows)."""
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

        Args:
            text (`str` or `list[str]`, *optional*): prompts holding one `<|audio|>` per clip.
            audio (*optional*): a clip or a list of clips: float/int-PCM arrays, lists, torch tensors (mono or
                multi-channel, averaged), file paths, `datasets` Audio cells (see [`to_mono_waveform`]).
            sampling_rate (`int`, *optional*): rate of raw arrays (required for them); all audio is resampled to
                `self.sampling_rate`.
            **kwargs: tokenizer options (`padding`, defaults to `True`; `truncation`, `max_length`, ...) and
                `return_tensors`.

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask` `(batch_size, sequence_length)` (if `text`) and the
            audio inputs `input_features`, `input_values`, `audio_lengths` (one row per 30 s window, clips in order;
            see [`MoWEFeatureExtractor`]), ready for `model(**inputs)` and `model.generate(**inputs)`.
        """
        for modality in ("images", "videos"):
            if kwargs.pop(modality, None) is not None:
                raise ValueError(f"MoWE models read audio and text only; `{modality}` cannot be processed.")
        if text is None and audio is None:
            raise ValueError("Give `text` (with one <|audio|> per clip) and/or `audio`.")
        texts = [text] if isinstance(text, str) else text
        if texts is not None and (not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts)):
            raise TypeError(f"`text` must be a string or a list of strings, got {type(text).__name__}.")
        sources = [] if audio is None else ([audio] if _is_single_clip(audio) else list(audio))
        if texts is not None:
            self._check_placeholders(texts, audio, sources)
        clips = []
        for i, source in enumerate(sources):
            try:
                clips.append(to_mono_waveform(source, sampling_rate, self.sampling_rate))
            except (TypeError, ValueError) as err:
                raise type(err)(f"Audio clip {i}: {err}" if len(sources) > 1 else str(err)) from err
        if texts is None:
            return self.feature_extractor(clips, sampling_rate=self.sampling_rate, **kwargs)
        return super().__call__(text=list(texts), audio=clips or None, sampling_rate=self.sampling_rate, **kwargs)

    def _check_placeholders(self, texts: list[str], audio: Any, sources: list) -> None:
        placeholders = sum(t.count(self.audio_token) for t in texts)
        if placeholders == len(sources):
            return
        message = (
            f"{_plural(len(sources), 'audio clip')} {'was' if len(sources) == 1 else 'were'} given but the text has "
            f"{_plural(placeholders, self.audio_token + ' placeholder')}; put one {self.audio_token} in the text "
            "where each clip belongs"
        )
        if len(sources) == 1 and getattr(audio, "ndim", 0) == 2 and placeholders in audio.shape:
            message += (
                f". A 2-D array of shape {tuple(audio.shape)} is one multi-channel clip; for a batch, pass a list of "
                "1-D arrays"
            )
        raise ValueError(message + ".")

    def _process_audio(self, audio: list[np.ndarray], **kwargs) -> tuple[BatchFeature, list[str]]:
        features = self.feature_extractor(audio, sampling_rate=self.sampling_rate)
        features["num_audio_tokens"] = [self.num_audio_tokens(len(clip)) for clip in audio]
        replacements = [self.replace_audio_token(features, audio_idx=i) for i in range(len(audio))]
        return features, replacements

    def replace_audio_token(self, audio_inputs: dict, audio_idx: int, **kwargs) -> str:
        return self.audio_token * audio_inputs["num_audio_tokens"][audio_idx]

    @property
    def unused_input_names(self) -> list[str]:
        return ["num_audio_tokens"]

    @property
    def model_input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask", "audio_lengths"]
        kinds = {f["kind"] for f in self.feature_extractor.front_ends}
        return names + ["input_features"] * ("log_mel" in kinds) + ["input_values"] * ("waveform" in kinds)

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict[str, str]] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_tensors: str | None = None,
        return_dict: bool = False,
        processor_kwargs: dict | None = None,
        **kwargs,
    ) -> str | list[str] | BatchFeature | Any:
        """Render chat `conversation`(s) and, with `tokenize=True`, process them with their audio.

        Message content is a string (one `<|audio|>` per clip of `audio=`) or a list of parts:
        `{"type": "text", "text": ...}`, `{"type": "audio", "audio": array | tensor | datasets cell | path}` (an
        array part may carry its `"sampling_rate"`), `{"type": "audio", "path": file}`, or `{"type": "audio"}`,
        which takes the next clip of `audio=`. Each audio part becomes one `<|audio|>` in text order, so any text
        chat template works. Raw arrays without a part rate use `sampling_rate=` (required for them).

        Args:
            conversation: one conversation (a list of `{"role", "content"}` messages) or a list of them.
            tokenize (`bool`, defaults to `False`): return the rendered text(s) if `False`; else tokenise.
            return_dict (`bool`, defaults to `False`): with `tokenize`, return the full [`BatchFeature`] (what
                `model(**inputs)` and `model.generate(**inputs)` take) instead of `input_ids` only.
            processor_kwargs (`dict`, *optional*): options for `__call__` (`sampling_rate`, `audio`, `padding`, ...);
                such options given as keyword arguments are accepted too. Other keyword arguments go to the template.

        Returns:
            The rendered string (a list of them for a batch), or with `tokenize=True` the [`BatchFeature`] /
            `input_ids` `(batch_size, sequence_length)`; batches are padded on the tokenizer's side.
        """
        if kwargs.pop("return_assistant_tokens_mask", False):
            raise ValueError(
                "return_assistant_tokens_mask is not supported by MoWEProcessor; MoWEDataCollator (training.py) "
                "builds assistant-only labels."
            )
        processor_kwargs = dict(processor_kwargs or {})
        for key in [k for k in kwargs if k in _PROCESSOR_KWARGS]:
            processor_kwargs[key] = kwargs.pop(key)
        sampling_rate = processor_kwargs.pop("sampling_rate", None)
        if "audio_kwargs" in processor_kwargs:
            processor_kwargs["audio_kwargs"] = dict(processor_kwargs["audio_kwargs"])
            sampling_rate = processor_kwargs["audio_kwargs"].pop("sampling_rate", sampling_rate)
        extra_audio = processor_kwargs.pop("audio", None)
        extra_sources = (
            [] if extra_audio is None else ([extra_audio] if _is_single_clip(extra_audio) else list(extra_audio))
        )

        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        flat_conversations, audio_parts = [], []
        for conv in conversations:
            flat_conversations.append([self._flatten_message(message, audio_parts) for message in conv])
        rendered = self.tokenizer.apply_chat_template(
            flat_conversations,
            chat_template=chat_template or self.chat_template,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **kwargs,
        )
        if not tokenize:
            return rendered if batched else rendered[0]

        clips = []
        for part in audio_parts:
            source = next((part[key] for key in ("audio", "path", "url") if part.get(key) is not None), None)
            if source is None:
                if not extra_sources:
                    raise ValueError(
                        "An audio part has no 'audio' or 'path' and no clip is left in `audio=`; give each "
                        "{'type': 'audio'} part its data or pass one clip per such part as `audio=`."
                    )
                source = extra_sources.pop(0)
            clips.append(to_mono_waveform(source, part.get("sampling_rate", sampling_rate), self.sampling_rate))
        if extra_sources:
            verb = "has" if len(extra_sources) == 1 else "have"
            raise ValueError(
                f"{_plural(len(extra_sources), 'audio clip')} given as `audio=` {verb} no {{'type': 'audio'}} part "
                "in the chat; add one part per clip."
            )
        processor_kwargs.setdefault("add_special_tokens", False)  # the template writes the special tokens
        outputs = self(
            text=rendered,
            audio=clips or None,
            sampling_rate=self.sampling_rate,
            return_tensors=return_tensors,
            **processor_kwargs,
        )
        return outputs if return_dict else outputs["input_ids"]

    def _flatten_message(self, message: dict, audio_parts: list[dict]) -> dict:
        """`message` with list content joined into one string, each audio part an `audio_token` (collected)."""
        content = message.get("content")
        if not isinstance(content, (list, tuple)):
            return message
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "audio":
                pieces.append(self.audio_token)
                audio_parts.append(part)
            elif kind == "text":
                pieces.append(part.get("text") or "")
            else:
                raise ValueError(
                    f"Unsupported content part of type {kind!r}; MoWE chats hold {{'type': 'text', 'text': ...}} "
                    "and {'type': 'audio', 'audio'|'path': ...} parts."
                )
        return {**message, "content": "".join(pieces)}

    @classmethod
    def from_mowe_config(cls, config, tokenizer, chat_template: str | None = None, **kwargs) -> MoWEProcessor:
        """The processor for a `MoWEConfig` and an LLM tokenizer, which gets `<|audio|>` (as a special token) and a
        pad token (its EOS) if it lacks them."""
        if AUDIO_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO_TOKEN]})
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
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
        padding_side: str = "left",
        **config_kwargs,
    ) -> MoWEProcessor:
        """The processor for the model `MoWEForConditionalGeneration.from_components` builds from the same parts.

        Front-ends come from the encoders' configs (Hub ids or local folders), the tokenizer from `text_model` with
        `<|audio|>` added as a special token if missing, a pad token (EOS) if missing and `padding_side` (left, for
        batched generation). `config_kwargs` (`router_type`, `stack_factor`, ...) must match the model's. Build the
        model with `audio_token_id=processor.audio_token_id`.
        """
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
        tokenizer.padding_side = padding_side
        return cls.from_mowe_config(config, tokenizer, chat_template=chat_template)


__all__ = ["MoWEProcessor", "DEFAULT_CHAT_TEMPLATE", "AUDIO_TOKEN"]

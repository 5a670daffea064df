"""MoWEProcessor: waveforms + text or chat messages -> exactly what MoWEForConditionalGeneration needs."""

from __future__ import annotations

import bisect
import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoConfig, AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.processing_utils import AudioKwargs, MultiModalData, ProcessorMixin, TextKwargs

# What `ProcessorMixin.apply_chat_template` renders with; the only accessor of the `{% generation %}` spans.
from transformers.utils.chat_template_utils import render_jinja_template

from .encoders import FrameSpec, WhisperFrameSpec, frame_spec_from_dict, num_audio_tokens
from .feature_extraction_mowe import MoWEFeatureExtractor, _is_single_clip, to_mono_waveform

AUDIO_TOKEN = "<|audio|>"
# The fallback chat template's turn markers: single special tokens, added to a tokenizer that lacks them.
TURN_TOKENS = ("<|im_start|>", "<|im_end|>")
TEMPLATE_FILE = "chat_template.jinja"

# Put in front of an LLM's own (text-only) template: list content becomes one string, each audio part one
# <|audio|>, so the LLM's turn markers and end-of-turn token are kept and audio sits where the user put it.
AUDIO_PARTS_AS_TEXT = (
    "{%- set mowe = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string or message['content'] is none -%}"
    "{%- set mowe.messages = mowe.messages + [message] -%}"
    "{%- else -%}"
    "{%- set text = namespace(value='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'audio' -%}{%- set text.value = text.value + '<|audio|>' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set mowe.messages = mowe.messages + [dict(message, content=text.value)] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = mowe.messages -%}\n"
)
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
_PROCESSOR_KWARGS = (
    set(TextKwargs.__annotations__)
    | set(AudioKwargs.__annotations__)
    | {"audio", "text_kwargs", "audio_kwargs", "common_kwargs"}
)


def default_chat_template() -> str | None:
    """MoWE's default (ChatML) template, read from `chat_template.jinja` beside this file when called.

    `None` where the file is absent: a checkpoint's copy of this code carries `.py` files only, and its processor
    loads its template from the checkpoint's own `chat_template.jinja`.
    """
    path = Path(__file__).with_name(TEMPLATE_FILE)
    return path.read_text() if path.is_file() else None


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _check_parts(content: Any) -> None:
    for part in content if isinstance(content, (list, tuple)) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "audio"):
            raise ValueError(
                f"Unsupported content part of type {kind!r}; MoWE chats hold {{'type': 'text', 'text': ...}} "
                "and {'type': 'audio', 'audio'|'path': ...} parts."
            )


def audio_part_data(part: Any) -> Any:
    """The data of a `{"type": "audio"}` content part (its `"audio"`, `"path"` or `"url"`), or `None`: a part without
    data, which takes the next clip given separately."""
    return next((part[key] for key in ("audio", "path", "url") if part.get(key) is not None), None)


def fill_audio_parts(messages: list[dict], clips: list) -> list[dict]:
    """Copies of `messages` whose audio parts without data hold the next of `clips`, in order, each taken from the
    front of the list (so the caller sees the clips left over). Once the list is empty a part stays without data;
    parts with data and other parts stay as given. The one place a chat's audio parts take their clips: the
    processor's `audio=`, the training collator's and the evaluation's audio column."""
    filled = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            content = [
                {**part, "audio": clips.pop(0)}
                if clips and isinstance(part, dict) and part.get("type") == "audio" and audio_part_data(part) is None
                else part
                for part in content
            ]
            message = {**message, "content": content}
        filled.append(message)
    return filled


def _is_batch_of_chats(conversation: Any) -> bool:
    return isinstance(conversation, (list, tuple)) and bool(conversation) and (
        isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
    )


def _objects_as_dicts(value: Any) -> Any:
    """`value` with every dataclass or pydantic model in it (messages, content parts, tool calls) turned into a
    dict, as transformers does before rendering; media (arrays, tensors) are kept as they are, not copied."""
    if isinstance(value, dict):
        return {key: _objects_as_dicts(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_objects_as_dicts(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _objects_as_dicts(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _objects_as_dicts(value.model_dump())
    return value


def _chat_as_dicts(conversation: Any) -> list[dict]:
    """A chat's messages as dicts (from dicts, dataclasses or pydantic models, their content parts too), keys whose
    value is None dropped; every message must have a role."""
    messages = []
    for index, message in enumerate(_objects_as_dicts(list(getattr(conversation, "messages", conversation)))):
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages must be dicts, dataclasses or pydantic models, got {message!r}.")
        message = {key: value for key, value in message.items() if value is not None}
        if "role" not in message:
            shown = repr(message)
            shown = shown if len(shown) <= 100 else shown[:97] + "..."
            raise ValueError(
                f"Chat message {index} has no 'role': {shown}. Give every message a role ('system', 'user' or "
                "'assistant'), e.g. {'role': 'user', 'content': ...}."
            )
        messages.append(message)
    return messages


def assistant_masks(
    offset_mapping: list[list[tuple[int, int]]], replacements: list[list[dict]], spans: list[list[tuple[int, int]]]
) -> list[list[int]]:
    """1 for each token that overlaps an assistant span, per row.

    Args:
        offset_mapping: each row's token character offsets in the text after placeholder expansion.
        replacements: each row's placeholder expansions (`"span"`: where the placeholder was, `"new_span"`: where
            its expansion is), as `ProcessorMixin.__call__` returns them with `return_text_replacement_offsets`.
        spans: each row's assistant character spans in the text before expansion.
    """
    masks = []
    for offsets, expansions, row_spans in zip(offset_mapping, replacements, spans):
        placeholder_ends = [r["span"][1] for r in expansions]
        chars_gained = [0] + [r["new_span"][1] - r["span"][1] for r in expansions]
        mask = [0] * len(offsets)
        for span in row_spans:
            # Shift the span past the placeholders expanded before it.
            start, end = (char + chars_gained[bisect.bisect_right(placeholder_ends, char)] for char in span)
            for position, (token_start, token_end) in enumerate(offsets):
                if token_start < end and token_end > start:  # zero-width tokens (padding, specials) never match
                    mask[position] = 1
        masks.append(mask)
    return masks


class MoWEProcessor(ProcessorMixin):
    r"""
    Constructs a MoWE processor from a [`MoWEFeatureExtractor`] and the LLM's tokenizer.

    Each `<|audio|>` placeholder in the text is expanded to as many audio tokens as its clip gives
    (`encoders.num_audio_tokens` summed over the clip's windows: the function the model uses too, so the two never
    disagree). Batched text is padded by default, on the tokenizer's padding side (left for generation).

    Args:
        feature_extractor ([`MoWEFeatureExtractor`]): computes the encoders' shared front-ends.
        tokenizer ([`PreTrainedTokenizerBase`]): the LLM's tokenizer, holding `audio_token` as a special token.
        chat_template (`str`, *optional*): Jinja template; defaults to `chat_template.jinja` (ChatML, audio parts
            as `<|audio|>`, assistant turns in `{% generation %}`).
        audio_token (`str`, defaults to `"<|audio|>"`): the placeholder, one per clip.
        frame_spec (`WhisperFrameSpec`, `ConvFrameSpec` or its `to_dict()`, *optional*): the base encoder's frame
            spec (`MoWEConfig.audio_frame_spec`); defaults to Whisper's (50 frames/s, 1500 per window).
        stack_factor (`int`, defaults to 4): encoder frames per audio token (`MoWEConfig.stack_factor`).
    """

    def __init__(
        self,
        feature_extractor: MoWEFeatureExtractor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        audio_token: str = AUDIO_TOKEN,
        frame_spec: FrameSpec | dict | None = None,
        stack_factor: int = 4,
    ):
        if tokenizer is not None and audio_token not in tokenizer.get_vocab():
            raise ValueError(
                f"The tokenizer has no {audio_token} token. Add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{audio_token!r}]}}) (and resize the "
                "model's embeddings), or build the processor with MoWEProcessor.from_components."
            )
        self.audio_token = audio_token
        self.frame_spec = frame_spec_from_dict(frame_spec) if isinstance(frame_spec, dict) else frame_spec
        self.frame_spec = self.frame_spec or WhisperFrameSpec()
        self.stack_factor = stack_factor
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template or default_chat_template())

    @property
    def audio_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.audio_token)

    @property
    def sampling_rate(self) -> int:
        return self.feature_extractor.sampling_rate

    def num_audio_tokens(self, num_samples: int) -> int:
        """Audio tokens a mono clip of `num_samples` samples at `sampling_rate` becomes (summed over its windows)."""
        return sum(
            int(num_audio_tokens(length, self.frame_spec, self.stack_factor))
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
                `self.sampling_rate`. May also come as `audio_kwargs={"sampling_rate": ...}`.
            **kwargs: tokenizer options (`padding`: a batch of texts is padded to its longest unless the call or the
                tokenizer's saved defaults say otherwise; `truncation`, `max_length`, ...) and `return_tensors`.

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask` `(batch_size, sequence_length)` (if `text`) and the
            audio inputs `input_features`, `input_values`, `audio_lengths` (one row per 30 s window, clips in order;
            see [`MoWEFeatureExtractor`]), ready for `model(**inputs)` and `model.generate(**inputs)`.
        """
        sampling_rate = self._pop_sampling_rate(sampling_rate, kwargs)
        if self._pads_by_default(text, kwargs):
            kwargs["padding"] = True  # set here: where processors declare defaults changed within transformers 5
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

    def _pads_by_default(self, text: Any, kwargs: dict) -> bool:
        """Whether a call pads because nothing else decides: a batch of texts, with `padding` set neither by the call
        (flat, `text_kwargs` or `common_kwargs`) nor by the tokenizer's saved defaults (a tokenizer saved with
        `padding="max_length", max_length=...` keeps padding to that length)."""
        if not isinstance(text, (list, tuple)) or len(text) < 2 or "padding" in kwargs:
            return False
        given = (kwargs.get(key) or {} for key in ("text_kwargs", "common_kwargs"))
        return not any("padding" in options for options in given) and "padding" not in self.tokenizer.init_kwargs

    @staticmethod
    def _pop_sampling_rate(sampling_rate: int | None, kwargs: dict) -> int | None:
        """The rate given as `sampling_rate=` or in `audio_kwargs` (removed from `kwargs`); both must agree."""
        if not kwargs.get("audio_kwargs") or "sampling_rate" not in kwargs["audio_kwargs"]:
            return sampling_rate
        kwargs["audio_kwargs"] = dict(kwargs["audio_kwargs"])
        nested = kwargs["audio_kwargs"].pop("sampling_rate")
        if sampling_rate is not None and nested is not None and nested != sampling_rate:
            raise ValueError(
                f"sampling_rate={sampling_rate} and audio_kwargs['sampling_rate']={nested} disagree; give it once."
            )
        return nested if sampling_rate is None else sampling_rate

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

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["frame_spec"] = self.frame_spec.to_dict()
        return output

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

    def _get_num_multimodal_tokens(self, audio_lengths: list[int] | None = None, **kwargs) -> MultiModalData:
        """Audio tokens each clip becomes, for serving stacks that budget tokens before processing.

        Args:
            audio_lengths (`list[int]`, *optional*): clip lengths in samples at `self.sampling_rate`.
        """
        if audio_lengths is None:
            return MultiModalData()
        return MultiModalData(num_audio_tokens=[self.num_audio_tokens(int(length)) for length in audio_lengths])

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        tokenize: bool = False,
        return_assistant_tokens_mask: bool = False,
        processor_kwargs: dict | None = None,
        **kwargs,
    ) -> str | list[str] | BatchFeature | Any:
        """Render chat `conversation`(s) with [`~ProcessorMixin.apply_chat_template`] and, with `tokenize=True`,
        process them with their audio.

        Messages may be dicts or message objects; content is a string (one `<|audio|>` per clip of `audio=`) or a
        list of parts, which reach the template as given: `{"type": "text", "text": ...}`,
        `{"type": "audio", "audio": array | tensor | datasets cell | path}` (an array part may carry its
        `"sampling_rate"`), `{"type": "audio", "path": file}`, or `{"type": "audio"}`, which takes the next clip of
        `audio=`. Audio is read, downmixed and resampled by [`to_mono_waveform`]; raw arrays without a part rate use
        `sampling_rate` (required for them), given as a keyword, in `processor_kwargs` or in its `audio_kwargs`.

        With `return_assistant_tokens_mask=True` (and `tokenize=True, return_dict=True`) the output holds
        `assistant_masks` `(batch_size, sequence_length)`: 1 on the tokens of assistant turns. Templates with
        `{% generation %}` mark them (the default template does, end-of-turn token included); for templates without
        it, an assistant turn is what rendering it adds after the generation prompt of the turns before it.

        Other arguments are those of [`~ProcessorMixin.apply_chat_template`] (`add_generation_prompt`,
        `continue_final_message`, `return_dict`, `return_tensors`, `tools`, ...); keyword arguments the template does
        not use go to `__call__` (`padding`, `audio`, `sampling_rate`, ...).
        """
        return_dict = kwargs.pop("return_dict", False)
        tensors = {"return_tensors": kwargs.pop("return_tensors")} if "return_tensors" in kwargs else {}
        processor_kwargs = dict(processor_kwargs or {})
        processor_kwargs.update({key: kwargs.pop(key) for key in list(kwargs) if key in _PROCESSOR_KWARGS})
        batched = _is_batch_of_chats(conversation)
        conversations = [_chat_as_dicts(c) for c in (conversation if batched else [conversation])]
        for message in (m for conv in conversations for m in conv):
            _check_parts(message.get("content"))
        template = self._chat_template_text(chat_template)
        if not tokenize:
            out = super().apply_chat_template(conversations, chat_template=template, **kwargs)
            return out if batched else out[0]

        conversations = self._load_chat_audio(conversations, processor_kwargs)
        processor_kwargs.setdefault("add_special_tokens", False)  # the template writes the special tokens
        if not return_assistant_tokens_mask:
            return super().apply_chat_template(
                conversations, chat_template=template, tokenize=True, return_dict=return_dict,
                processor_kwargs=processor_kwargs, **tensors, **kwargs,
            )
        # The assistant mask is computed here on every transformers version: token offsets and the placeholder
        # expansions come from `__call__`, the assistant turns' character spans from the template.
        processor_kwargs.update(return_offsets_mapping=True, return_text_replacement_offsets=True)
        out = super().apply_chat_template(
            conversations, chat_template=template, tokenize=True, return_dict=True, return_tensors=None,
            processor_kwargs=processor_kwargs, **kwargs,
        )
        spans = self._assistant_spans(conversations, template, kwargs)
        replacements = out.pop("text_replacement_offsets", None) or [[] for _ in spans]
        masks = assistant_masks(out.pop("offset_mapping"), replacements, spans)
        out["assistant_masks"] = np.asarray(masks, dtype=np.int64) if len({len(m) for m in masks}) <= 1 else masks
        return_tensors = tensors.get("return_tensors")
        out.convert_to_tensors(tensor_type=None if return_tensors == "auto" else return_tensors)
        return out if return_dict else out["input_ids"]

    def _chat_template_text(self, chat_template: str | None) -> str:
        """The Jinja source to render: `chat_template` itself, or the processor's template of that name (default:
        its only template, or the one named "default")."""
        templates = self.chat_template
        if isinstance(templates, dict):
            name = chat_template or "default"
            if name in templates:
                return templates[name]
            if chat_template is None:
                raise ValueError(
                    f"The processor has several chat templates and none is named 'default'; pass "
                    f"`chat_template=` one of {sorted(templates)} or a Jinja template."
                )
            return chat_template
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise ValueError("The processor has no chat template; pass `chat_template=` (a Jinja template).")
        return templates

    def _load_chat_audio(self, conversations: list[list[dict]], processor_kwargs: dict) -> list[list[dict]]:
        """Copies of `conversations` whose audio parts hold their clip as a mono waveform at `self.sampling_rate`
        (`{"type": "audio"}` parts take the clips of `processor_kwargs["audio"]` in order); `processor_kwargs`
        then says that rate."""
        sampling_rate = self._pop_sampling_rate(processor_kwargs.pop("sampling_rate", None), processor_kwargs)
        extra = processor_kwargs.pop("audio", None)
        extra = [] if extra is None else ([extra] if _is_single_clip(extra) else list(extra))
        loaded = []
        for conversation in conversations:
            loaded.append([])
            for message in fill_audio_parts(conversation, extra):
                content = message.get("content")
                if isinstance(content, (list, tuple)):
                    message = {**message, "content": [self._load_part(p, sampling_rate) for p in content]}
                loaded[-1].append(message)
        if extra:
            verb = "has" if len(extra) == 1 else "have"
            raise ValueError(
                f"{_plural(len(extra), 'audio clip')} given as `audio=` {verb} no {{'type': 'audio'}} part in the "
                "chat; add one part per clip."
            )
        processor_kwargs["sampling_rate"] = self.sampling_rate
        return loaded

    def _load_part(self, part: dict, sampling_rate: int | None) -> dict:
        if part.get("type") != "audio":
            return part
        source = audio_part_data(part)
        if source is None:
            raise ValueError(
                "An audio part has no 'audio' or 'path' and no clip is left in `audio=`; give each "
                "{'type': 'audio'} part its data or pass one clip per such part as `audio=`."
            )
        wave = to_mono_waveform(source, part.get("sampling_rate", sampling_rate), self.sampling_rate)
        return {"type": "audio", "audio": wave}

    def _assistant_spans(self, conversations: list[list[dict]], template: str, template_kwargs: dict) -> list[list]:
        """Character spans of the assistant turns of each conversation rendered with `template`: what
        `{% generation %}` marks, or, for templates without it, what rendering each turn adds after the generation
        prompt of the turns before it (its end-of-turn marker included)."""
        if _GENERATION_TAG.search(template):
            _, spans = render_jinja_template(
                conversations=conversations, chat_template=template, return_assistant_tokens_mask=True,
                **{**self.tokenizer.special_tokens_map, **template_kwargs},
            )
            return spans
        return [self._assistant_spans_by_prefix(conv, template, template_kwargs) for conv in conversations]

    def _assistant_spans_by_prefix(self, conversation: list[dict], template: str, template_kwargs: dict) -> list:
        def render(messages: list[dict], add_generation_prompt: bool) -> str:
            return ProcessorMixin.apply_chat_template(
                self, messages, chat_template=template, add_generation_prompt=add_generation_prompt,
                **{k: v for k, v in template_kwargs.items() if k != "add_generation_prompt"},
            )

        spans, done = [], ""
        for i, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            prompt, full = render(conversation[:i], True), render(conversation[: i + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError(
                    "The chat template does not render a conversation as a prefix of its continuation, so assistant "
                    "tokens cannot be found; add {% generation %} ... {% endgeneration %} around assistant turns."
                )
            spans.append((len(prompt), len(full)))
            done = full
        return spans

    @property
    def end_of_turn_token_ids(self) -> list[int]:
        """Token ids that end an assistant turn under this processor's chat template, then the tokenizer's EOS:
        what `generation_config.eos_token_id` must hold so that `generate` stops where training labels end."""
        marker = "MoWE-turn-end-probe"
        rendered = self.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}]
        )
        after = rendered[rendered.rindex(marker) + len(marker) :]
        ids = self.tokenizer(after, add_special_tokens=False)["input_ids"][:1]
        stops = [i for i in ids if i in self.tokenizer.added_tokens_decoder]
        eos = self.tokenizer.eos_token_id
        return stops + ([eos] if eos is not None and eos not in stops else [])

    @classmethod
    def from_mowe_config(cls, config, tokenizer, chat_template: str | None = None, **kwargs) -> MoWEProcessor:
        """The processor for a `MoWEConfig` and an LLM tokenizer.

        The chat template is `chat_template`, else the tokenizer's own with audio parts rendered as `<|audio|>` (so
        the LLM keeps its turn markers and end-of-turn token), else MoWE's ChatML default, whose turn markers are
        then added to the tokenizer as special tokens. The tokenizer also gets `<|audio|>` (special) and a pad token
        (its EOS) if it lacks them. Build the model with `MoWEForConditionalGeneration.from_components(...,
        processor=processor)`, which grows its embeddings to the tokenizer and stops `generate` at the end of turn.
        """
        own = getattr(tokenizer, "chat_template", None)
        if chat_template is None and isinstance(own, str):
            chat_template = AUDIO_PARTS_AS_TEXT + own
        new_tokens = [] if chat_template is not None else list(TURN_TOKENS)
        new_tokens = [t for t in [*new_tokens, AUDIO_TOKEN] if t not in tokenizer.get_vocab()]
        if new_tokens:
            tokenizer.add_special_tokens({"additional_special_tokens": new_tokens}, replace_extra_special_tokens=False)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(
            feature_extractor=MoWEFeatureExtractor.from_mowe_config(config),
            tokenizer=tokenizer,
            chat_template=chat_template,
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

        Front-ends come from the encoders' configs (Hub ids or local folders), the tokenizer and chat template from
        `text_model` as [`~MoWEProcessor.from_mowe_config`] sets them up, with `padding_side` (left, for batched
        generation). `config_kwargs` (`router_type`, `stack_factor`, ...) must match the model's. Build the model
        with `MoWEForConditionalGeneration.from_components(..., processor=processor)`.
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


__all__ = ["MoWEProcessor", "AUDIO_TOKEN", "default_chat_template", "fill_audio_parts"]

"""Answering questions about audio with a saved MoWE model: generate-and-decode (`generate_replies`), the one-clip
answer built on it, and the Inference Endpoints handler.

`publishing.build_hub_folder` copies this file into every published folder as `handler.py`, where the mowe-audio
package is not installed: it therefore imports only numpy, torch and transformers (the model's own code comes from
its folder through `trust_remote_code=True`), and nothing from its sibling files. `examples/inference.py` imports
`load` and `answer` from here, `evaluation.generate_answers` uses `generate_replies`; the Gradio Space
(`examples/space/app.py`) loads them from the model repository's `handler.py`.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoProcessor

DEFAULT_GENERATION = {"max_new_tokens": 64, "do_sample": False}


def load(model_id: str, device: str | None = None) -> tuple[torch.nn.Module, Any]:
    """The model (in eval mode; bfloat16 on CUDA, float32 elsewhere) and processor of a MoWE folder or Hub id."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
    model = AutoModel.from_pretrained(model_id, trust_remote_code=True, dtype=dtype).to(device).eval()
    return model, processor


def answer(
    model: torch.nn.Module,
    processor: Any,
    audio: str | os.PathLike | bytes | np.ndarray | list[float],
    question: str,
    sampling_rate: int | None = None,
    **generate_kwargs: Any,
) -> str:
    """The model's answer (greedy, 64 new tokens at most, unless `generate_kwargs` say otherwise) to `question` about
    one clip, stripped of surrounding whitespace.

    Args:
        audio: an audio file's path or bytes (wav, flac, ogg), or samples: `[num_samples]` or `[num_samples,
            channels]` floats or integer PCM, with their `sampling_rate`. Resampled to 16 kHz and downmixed by the
            processor, which raises `ValueError` for audio it cannot use (empty, NaN, no sampling rate, ...).
        question: the text that follows the clip in the user's turn.
    """
    if isinstance(audio, (str, os.PathLike)):
        part = {"type": "audio", "path": os.fspath(audio)}
    else:
        part = {"type": "audio", "audio": audio if isinstance(audio, bytes) else np.asarray(audio)}
    if sampling_rate is not None:
        part["sampling_rate"] = int(sampling_rate)
    messages = [{"role": "user", "content": [part, {"type": "text", "text": question}]}]
    return generate_replies(model, processor, [messages], **generate_kwargs)[0]


def generate_replies(model: torch.nn.Module, processor: Any, conversations: list, **generate_kwargs: Any) -> list[str]:
    """The model's next assistant turn in each chat of `conversations` (greedy, 64 new tokens at most, unless
    `generate_kwargs` say otherwise): rendered with the generation prompt and processed with their audio by
    `processor.apply_chat_template`, generated in one batch (padded on the tokenizer's side: left, for replies equal
    to each chat's alone), the new tokens decoded without special tokens and stripped of surrounding whitespace."""
    inputs = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device, dtype=model.dtype)
    with torch.no_grad():
        generated = model.generate(**inputs, **{**DEFAULT_GENERATION, **generate_kwargs})
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    return [reply.strip() for reply in processor.batch_decode(new_tokens, skip_special_tokens=True)]


class EndpointHandler:
    """A custom Inference Endpoints handler: answers questions about audio clips.

    Request: `{"inputs": {"audio": <base64 wav/flac/ogg> | [floats], "sampling_rate": int (with floats),
    "text": question}, "parameters": {generate() options}}`; `inputs` may also be a list of such dicts.
    Response: `[{"generated_text": answer}]`, one entry per input.
    """

    def __init__(self, path: str = ""):
        self.model, self.processor = load(path)

    def __call__(self, data: dict[str, Any]) -> list[dict[str, str]]:
        inputs = data.get("inputs", data)
        requests = inputs if isinstance(inputs, list) else [inputs]
        parameters = {"max_new_tokens": 128, **(data.get("parameters") or {})}
        return [{"generated_text": self.answer_request(request, parameters)} for request in requests]

    def answer_request(self, request: dict[str, Any], parameters: dict[str, Any]) -> str:
        if not isinstance(request, dict) or "audio" not in request or not request.get("text"):
            raise ValueError(
                'Each input must be {"audio": <base64 audio file> or [floats] with "sampling_rate", "text": question}.'
            )
        audio = request["audio"]
        if isinstance(audio, str):
            audio = base64.b64decode(audio.split(",", 1)[-1] if audio.startswith("data:") else audio)
        elif "sampling_rate" not in request:
            raise ValueError('Raw audio samples need their "sampling_rate" (e.g. 16000).')
        else:
            audio = np.asarray(audio, dtype=np.float32)
        return answer(
            self.model, self.processor, audio, str(request["text"]), request.get("sampling_rate"), **parameters
        )

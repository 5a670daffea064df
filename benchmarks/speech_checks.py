"""Proof helpers for real Whisper weights: English espeak-ng speech, Whisper's greedy transcripts and their WER.

Used by `tests/test_pretrained.py`, `bench_real_weights.py` and `bench_quantization.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from modeling_mowe.encoders import SAMPLING_RATE

ENGLISH_SENTENCES = (
    "The weather is nice today.",
    "Please open the window in the kitchen.",
    "My brother bought a new car last week.",
    "We will meet at the station at noon.",
    "The children are playing in the garden.",
    "She reads a book every evening.",
    "The train to London leaves in the morning.",
    "Could you pass me the salt, please?",
    "The coffee in this shop is very good.",
    "He forgot his keys at the office.",
    "The music was too loud last night.",
    "I would like a glass of cold water.",
)
"""Everyday English for the Whisper checks: espeak-ng speaks them, a pretrained Whisper should transcribe them."""


def english_speech(
    sentences: Sequence[str] = ENGLISH_SENTENCES, voice: str = "en-us", rate: int = 150, seed: int = 0
) -> list[np.ndarray]:
    """16 kHz espeak-ng clips of `sentences` (float32, shape `[num_samples]` each), with light noise."""
    from modeling_mowe.data import make_speech

    rng = np.random.default_rng(seed)
    return [make_speech(text, voice, rate, SAMPLING_RATE, rng) for text in sentences]


@torch.no_grad()
def whisper_transcribe(model, processor, clips: Sequence[np.ndarray], encoder_outputs=None) -> list[str]:
    """Greedy transcripts of 16 kHz `clips` by a `WhisperForConditionalGeneration` (English, no timestamps).

    `encoder_outputs` (a `BaseModelOutput` with `last_hidden_state` `[batch, frames, d_model]`) replaces the
    model's own encoder run, e.g. to decode features computed another way.
    """
    features = processor.feature_extractor(list(clips), sampling_rate=SAMPLING_RATE, return_tensors="pt")
    features = features.input_features
    kwargs = {"language": "en", "task": "transcribe"} if model.generation_config.is_multilingual else {}
    if encoder_outputs is not None:
        kwargs["encoder_outputs"] = encoder_outputs
    generated = model.generate(features, do_sample=False, num_beams=1, max_new_tokens=64, **kwargs)
    return processor.tokenizer.batch_decode(generated, skip_special_tokens=True)


def word_error_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus WER after the project's answer normalisation (`modeling_mowe.evaluation`)."""
    from modeling_mowe.evaluation import score_predictions

    return score_predictions(["asr"] * len(references), predictions, references)["summary"]["asr_wer"]

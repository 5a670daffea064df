"""Answer a question about an audio file with a MoWE audio LLM (a local folder or a Hub id).

    python examples/inference.py --model outputs/mowe-demo --audio clip.wav --question "Transcribe the audio."
    python examples/inference.py --model <user>/<mowe-model> --audio clip.wav --question "Is the speaker male or female?"

The model's code is loaded from its folder (`trust_remote_code=True`), so this script needs only transformers, torch,
soundfile and soxr, not the mowe-audio package.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModel, AutoProcessor


def answer(model, processor, audio_path: str, question: str, max_new_tokens: int = 64) -> str:
    """The model's greedy answer to `question` about the audio file at `audio_path`."""
    messages = [
        {"role": "user", "content": [{"type": "audio", "path": audio_path}, {"type": "text", "text": question}]}
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device, dtype=model.dtype)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A MoWE folder or Hub id.")
    parser.add_argument("--audio", required=True, help="An audio file (wav, flac, ogg); resampled to 16 kHz.")
    parser.add_argument("--question", default="Transcribe the audio.", help="The question about the audio.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=dtype).to(args.device).eval()
    print(answer(model, processor, args.audio, args.question, args.max_new_tokens))


if __name__ == "__main__":
    main()

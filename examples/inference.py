"""Answer a question about an audio file with a MoWE audio LLM (a local folder or a Hub id).

    python examples/inference.py --model outputs/demo/mowe-model --audio clip.wav \\
        --question "How many beeps do you hear?"

The answer comes from `modeling_mowe.handler.answer`, the function the Inference Endpoints handler and the Gradio
Space use too. The model's code is loaded from its folder (`trust_remote_code=True`).
"""

from __future__ import annotations

import argparse

from modeling_mowe.handler import answer, load


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A MoWE folder or Hub id.")
    parser.add_argument("--audio", required=True, help="An audio file (wav, flac, ogg); resampled to 16 kHz.")
    parser.add_argument("--question", default="Transcribe the audio.", help="The question about the audio.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available).")
    args = parser.parse_args(argv)

    model, processor = load(args.model, args.device)
    text = answer(model, processor, args.audio, args.question, max_new_tokens=args.max_new_tokens)
    print(text)
    return text


if __name__ == "__main__":
    main()

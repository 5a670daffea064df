"""Gradio demo of a MoWE audio LLM: record or upload audio, ask a question, read the answer.

On a Hugging Face Space, set the Space variable `MOWE_MODEL` to a MoWE model repository. Locally:

    MOWE_MODEL=outputs/demo/mowe-model python examples/space/app.py

with any MoWE folder or Hub id written by `build_hub_folder` (or pass `--model`); the port is gradio's
(`$GRADIO_SERVER_PORT`, else 7860) unless `--port` says otherwise.

The model's code comes from its repository (`trust_remote_code=True`), and so does the answering code: the
repository's `handler.py` (written by `modeling_mowe.publishing.build_hub_folder`; its `load` and `answer` serve the
Inference Endpoints handler and `examples/inference.py` too). The app needs only gradio, transformers, torch,
soundfile and soxr.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import gradio as gr
import numpy as np
from transformers.dynamic_module_utils import get_class_from_dynamic_module

DEFAULT_QUESTION = "Transcribe the audio."
EXAMPLE_AUDIO = "example.wav"


class MoWEDemo:
    """A loaded MoWE model and processor that answer questions about audio clips."""

    def __init__(self, model_id: str, device: str | None = None):
        self.model_id = model_id
        load = get_class_from_dynamic_module("handler.load", model_id)
        self._answer = get_class_from_dynamic_module("handler.answer", model_id)
        self.model, self.processor = load(model_id, device)

    def answer(self, audio: tuple[int, np.ndarray] | None, question: str, max_new_tokens: int = 64) -> str:
        """The greedy answer to `question` about `audio`, given as Gradio's numpy audio `(sampling_rate, samples)`."""
        if audio is None:
            raise gr.Error("Record or upload an audio clip first.")
        if not question or not question.strip():
            raise gr.Error("Type a question about the audio.")
        sampling_rate, waveform = audio
        try:
            return self._answer(
                self.model,
                self.processor,
                waveform,
                question.strip(),
                sampling_rate,
                max_new_tokens=int(max_new_tokens),
            )
        except (TypeError, ValueError) as err:
            raise gr.Error(str(err)) from err


def model_example(model_id: str) -> tuple[str, str] | None:
    """The example clip and question a MoWE repository ships (`example.wav` and its card's widget), if any."""
    from huggingface_hub import ModelCard, hf_hub_download

    try:
        if Path(model_id).is_dir():
            audio_path, card = Path(model_id) / EXAMPLE_AUDIO, ModelCard.load(Path(model_id) / "README.md")
        else:
            audio_path, card = Path(hf_hub_download(model_id, EXAMPLE_AUDIO)), ModelCard.load(model_id)
    except Exception:  # an optional nicety: no example file, no card, or no network
        return None
    if not audio_path.is_file():
        return None
    widget = card.data.get("widget") or [{}]
    return str(audio_path), widget[0].get("text") or DEFAULT_QUESTION


def build_demo(demo: MoWEDemo) -> gr.Blocks:
    """The Gradio interface around `demo`."""
    with gr.Blocks(title="MoWE audio LLM") as blocks:
        gr.Markdown(
            "# MoWE audio LLM\n"
            f"Ask a question about a clip. Model: `{demo.model_id}`, a multi-task audio LLM with a Mixture of Weak "
            "Encoders ([arXiv 2409.06635](https://arxiv.org/abs/2409.06635))."
        )
        with gr.Row():
            with gr.Column():
                audio = gr.Audio(sources=["upload", "microphone"], type="numpy", label="Audio")
                question = gr.Textbox(label="Question", value=DEFAULT_QUESTION, lines=1)
                max_new_tokens = gr.Slider(1, 256, value=64, step=1, label="Max new tokens")
                ask = gr.Button("Ask", variant="primary")
            with gr.Column():
                answer = gr.Textbox(label="Answer", lines=4, interactive=False)
        example = model_example(demo.model_id)
        if example is not None:
            gr.Examples([list(example)], inputs=[audio, question])
        gr.on([ask.click, question.submit], demo.answer, inputs=[audio, question, max_new_tokens], outputs=answer)
    return blocks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Gradio demo of a MoWE audio LLM.")
    parser.add_argument("--model", default=os.environ.get("MOWE_MODEL"), help="MoWE folder or Hub id ($MOWE_MODEL).")
    parser.add_argument("--host", default=None, help="Server address (default: gradio's, $GRADIO_SERVER_NAME).")
    parser.add_argument("--port", type=int, default=None, help="Server port (default: gradio's, $GRADIO_SERVER_PORT).")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available).")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("no model: pass --model or set MOWE_MODEL to a MoWE folder or Hub id.")
    build_demo(MoWEDemo(args.model, args.device)).queue().launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()

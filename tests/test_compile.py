"""`torch.compile` on the tiny preset: the same logits and the same generated tokens as eager; every step of the
audio tower without graph breaks, its sparse dispatch eager.

The test compiles with the `aot_eager` backend (TorchDynamo's graph capture and AOTAutograd, without Inductor's code
generation, which takes minutes on a loaded CPU): what the model code decides, graph breaks and runtime checks
included. `benchmarks/bench_model.py` times the default Inductor backend against eager.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model, make_clip, make_inputs

from modeling_mowe.modeling_mowe import MoWEProjector, check_audio_inputs

TEXTS = ["Transcribe the audio. <|audio|>", "<|audio|> Is the speaker male or female?"]


def test_input_checks_compile_without_graph_breaks_and_still_raise_in_eager(fast_config, processor):
    """The checks of the forward run on the device (`torch_compilable_check`): `fullgraph=True` accepts them, where a
    host sync (`.tolist()`, `int(tensor)`) would break the graph; eager still raises the `ValueError`."""
    model = build_model(fast_config)
    inputs = make_inputs(processor, TEXTS, [make_clip(0.7, seed=1), make_clip(1.3, seed=2)])
    audio = (inputs["input_features"], inputs["input_values"], inputs["audio_lengths"])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    num_audio_tokens = int((inputs["input_ids"] == fast_config.audio_token_id).sum())
    torch._dynamo.reset()
    torch.compile(check_audio_inputs, fullgraph=True, backend="aot_eager")(*audio)
    mask = torch.compile(model.model.get_placeholder_mask, fullgraph=True, backend="aot_eager")(
        inputs["input_ids"], embeds, num_audio_tokens
    )
    assert int(mask[..., 0].sum()) == num_audio_tokens
    with pytest.raises(ValueError, match="NaN or Inf"):
        check_audio_inputs(audio[0].clone().fill_(float("nan")), *audio[1:])
    with pytest.raises(ValueError, match="audio placeholder tokens"):
        model.model.get_placeholder_mask(inputs["input_ids"], embeds, num_audio_tokens + 1)


def test_every_part_of_the_tower_compiles_without_graph_breaks_but_the_sparse_dispatch(fast_config, processor):
    """`fullgraph=True` takes each step of the tower and gives eager's values: the base encoder (a dynamic-length
    Whisper, its width from the features' shape), the routers, a weak Whisper and a weak HuBERT on the windows routed
    to them (no host read of their lengths), an idle call, the projector. What runs eager is the dispatch between them:
    whether a weak encoder runs at all depends on the routing decision (data-dependent control flow)."""
    model = build_model(fast_config)
    tower, config = model.model.audio_tower, fast_config
    assert [c.model_type for c in config.weak_encoder_configs[:3]] == ["whisper", "whisper", "hubert"]
    inputs = make_inputs(processor, TEXTS, [make_clip(0.7, seed=1), make_clip(1.3, seed=2)])
    audio = (inputs["input_features"], inputs["input_values"], inputs["audio_lengths"])
    with torch.no_grad():
        features = tower(*audio)
    base = features.last_hidden_state[..., : tower.base_hidden_size]
    frames, rows = base.shape[1], torch.tensor([1])
    base_config, base_inputs = config.base_encoder_config, tower.encoder_inputs(config.base_encoder_config, *audio[:2])
    summary_config = copy.deepcopy(config)
    summary_config.projector_window_summary = True
    steps = {
        "base encoder": (
            lambda x, n: tower.run_encoder(base_config, tower.base_encoder, x, n).last_hidden_state,
            (base_inputs, audio[2]),
        ),
        "routers": (lambda h, v: tower.route(h, v)[0], (base, features.valid_frames)),
        "weak whisper": (lambda r, *a: tower.weak_features(0, r, *a, frames), (rows, *audio)),
        "weak hubert": (lambda r, *a: tower.weak_features(2, r, *a, frames), (rows, *audio)),
        "idle call": (lambda *a: tower.idle_weak_features(1, *a), audio[:2]),
        "projector": (model.model.multi_modal_projector, (features.last_hidden_state, features.valid_frames)),
        "projector with a window summary": (
            MoWEProjector(summary_config, tower.output_size).eval(),
            (features.last_hidden_state, features.valid_frames),
        ),
    }
    torch._dynamo.reset()
    with torch.no_grad():
        for name, (step, args) in steps.items():
            compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
            torch.testing.assert_close(compiled, step(*args), atol=1e-5, rtol=1e-5, msg=name)
        with pytest.raises(Exception, match="data-dependent"):
            torch.compile(tower, fullgraph=True, backend="aot_eager")(*audio)


@pytest.mark.slow
def test_compiled_forward_and_generate_equal_eager(fast_config, processor):
    model = build_model(fast_config, seed=7)
    clips = [make_clip(0.7, seed=1), make_clip(1.3, seed=2, kind="sine")]
    inputs = make_inputs(processor, TEXTS, clips, padding_side="left")
    generate = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        eager = model.generate(**inputs, **generate)
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, backend="aot_eager")  # what `generate` calls at every step
        compiled = model.generate(**inputs, **generate)

    assert torch.equal(compiled.sequences, eager.sequences)
    for compiled_step, eager_step in zip(compiled.logits, eager.logits, strict=True):  # the first: the full forward
        torch.testing.assert_close(compiled_step, eager_step, atol=1e-4, rtol=1e-4)

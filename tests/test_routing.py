"""The routing decision is made once, in the audio tower, and read from its output by everyone else."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_model, make_clip, make_inputs
from transformers import TrainerControl, TrainerState, TrainingArguments

from modeling_mowe.routing import routing_entropy, top_k_gates
from modeling_mowe.training import RoutingStatsCallback

CLIPS = [make_clip(s, seed=i, kind="sine" if i % 2 else "noise") for i, s in enumerate((0.6, 1.2, 2.1, 0.9, 1.5))]
TEXTS = [f"clip {i}: <|audio|>" for i in range(len(CLIPS))]


@pytest.mark.parametrize("top_k", [1, 2])
def test_tower_returns_the_selection_it_dispatched(fast_config, processor, top_k):
    fast_config.router_top_k = top_k
    model = build_model(fast_config, seed=3)
    tower = model.model.audio_tower
    ran_on: dict[int, int] = {}

    def counter(weak_index):
        return lambda _module, _args, output: ran_on.update({weak_index: output.last_hidden_state.shape[0]})

    handles = [enc.register_forward_hook(counter(i)) for i, enc in enumerate(tower.weak_encoders)]
    inputs = make_inputs(processor, TEXTS, CLIPS)
    with torch.no_grad():
        audio = model.get_audio_features(inputs["input_features"], inputs["input_values"], inputs["audio_lengths"])
        out = model(**inputs)
    for handle in handles:
        handle.remove()

    windows, routers = len(CLIPS), len(fast_config.active_routers)
    assert audio.router_indices.shape == audio.router_gates.shape == (windows, routers, top_k)
    assert torch.equal(out.router_indices, audio.router_indices)  # carried to the model's output unchanged
    probs = audio.router_logits.float().softmax(-1)
    torch.testing.assert_close(audio.router_gates, probs.gather(-1, audio.router_indices))  # gates: probabilities
    assert (audio.router_gates[..., :-1] >= audio.router_gates[..., 1:]).all()  # best first
    assert all(len(set(picked)) == top_k for row in audio.router_indices.tolist() for picked in row)
    # Each weak encoder ran on exactly the windows some router selected it for.
    selected = {e: int((audio.router_indices == e).any(-1).any(-1).sum()) for e in range(len(tower.weak_encoders))}
    assert ran_on == {e: n for e, n in selected.items() if n}


def test_routing_stats_callback_counts_the_tower_selection(fast_config, processor):
    model = build_model(fast_config, seed=5).train()
    callback = RoutingStatsCallback()
    state, control = TrainerState(), TrainerControl()
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    callback.on_train_begin(args, state, control, model=model)
    selections, logits = [], []
    for clips in (CLIPS[:3], CLIPS[3:]):
        inputs = make_inputs(processor, TEXTS[: len(clips)], clips)
        out = model(**inputs)
        selections.append(out.router_indices)
        logits.append(out.router_logits.detach())
    logs = {"loss": 1.0}
    callback.on_log(args, state, control, logs=logs)
    callback.on_train_end(args, state, control)

    chosen = torch.cat(selections)  # [windows, routers, top_k]
    num_weak = len(model.model.audio_tower.weak_encoders)
    for r, router in enumerate(fast_config.active_routers):
        for e, weak in enumerate(fast_config.weak_encoder_configs):
            expected = float((chosen[:, r] == e).sum()) / chosen[:, r].numel()
            assert logs[f"routing/{router}/{e}_{weak.model_type}"] == pytest.approx(expected, abs=1e-4)
        assert sum(logs[f"routing/{router}/{e}_{w.model_type}"] for e, w in enumerate(
            fast_config.weak_encoder_configs)) == pytest.approx(1.0, abs=1e-3)
    assert num_weak == 4 and "routing/aux_loss" in logs
    entropy = routing_entropy(torch.cat(logits)).mean(0)  # [routers]
    for r, router in enumerate(fast_config.active_routers):
        assert logs[f"routing/{router}/entropy"] == pytest.approx(float(entropy[r]), abs=1e-4)
        assert 0 <= logs[f"routing/{router}/entropy"] <= math.log(num_weak) + 1e-3


def test_training_routing_tries_every_weak_encoder_in_proportion_eval_routing_is_deterministic():
    equal = torch.zeros(4000, 4)
    eval_index = top_k_gates(equal, 1)[1]
    assert (eval_index == eval_index[0]).all()  # eval: one kernel-chosen winner of the tie for every clip
    counts = torch.bincount(top_k_gates(equal, 1, sample=True)[1].reshape(-1), minlength=4) / 4000
    torch.testing.assert_close(counts, torch.full((4,), 0.25), atol=0.03, rtol=0)

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(4000, -1)
    probs, index, gates = top_k_gates(logits, 1, sample=True)
    counts = torch.bincount(index.reshape(-1), minlength=4) / 4000
    torch.testing.assert_close(counts, logits[0].softmax(-1), atol=0.03, rtol=0)  # drawn from the router's own p
    torch.testing.assert_close(gates, probs.gather(-1, index))
    _, index, _ = top_k_gates(logits, 2, sample=True)
    assert (index[:, 0] != index[:, 1]).all()  # k distinct weak encoders
    assert routing_entropy(equal[:1]).item() == pytest.approx(math.log(4))


def test_top_k_gates_returns_a_named_decision_that_still_unpacks():
    from modeling_mowe.routing import RoutingDecision, top_k_gates

    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    decision = top_k_gates(logits, top_k=2)
    assert isinstance(decision, RoutingDecision)
    probs, index, gates = decision
    assert torch.equal(decision.index, index) and index.tolist() == [[1, 2], [0, 1]]
    torch.testing.assert_close(decision.gates, decision.probs.gather(-1, index))
    torch.testing.assert_close(probs, logits.softmax(-1))

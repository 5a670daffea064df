"""MoWEForConditionalGeneration: routing, sparse dispatch, aux-loss gradients, padding, generation, persistence."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_clip, make_inputs
from torch import nn
from transformers import (
    BertConfig,
    GPT2Config,
    HubertModel,
    LlamaForCausalLM,
    Qwen2Config,
    WhisperForConditionalGeneration,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

import modeling_mowe  # noqa: F401  (registers the Auto classes)
from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration
from modeling_mowe.routing import load_balancing_loss

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Transcribe the audio. <|audio|>", "<|audio|> Is the speaker male or female? Answer:"]


def two_clips():
    return [make_clip(0.7, seed=1), make_clip(1.9, seed=2, kind="sine")]


def lm_labels(inputs, audio_token_id):
    labels = inputs["input_ids"].clone()
    labels[(inputs["attention_mask"] == 0) | (labels == audio_token_id)] = -100
    return labels


def force_routing(model, independent: int, dependent: int, margin: float = 4.0):
    """Make the data-independent router pick `independent` and the data-dependent one `dependent` for every clip,
    in training too (no sampled exploration)."""
    model.config.router_sampling = False
    tower = model.model.audio_tower
    num = len(tower.weak_encoders)
    with torch.no_grad():
        tower.router_independent.logits.zero_()
        tower.router_independent.logits[independent] = margin
        tower.router_dependent.classifier.weight.zero_()
        tower.router_dependent.classifier.bias.copy_(torch.zeros(num))
        tower.router_dependent.classifier.bias[dependent] = margin


def selected_windows(router_indices):
    """Per weak encoder, the windows any router routed to it, from the model's `router_indices`:
    {weak_index: set(rows)}."""
    chosen: dict[int, set] = {}
    for row, per_router in enumerate(router_indices.tolist()):
        for weak_indices in per_router:
            for e in weak_indices:
                chosen.setdefault(e, set()).add(row)
    return chosen


def count_rows(module, store, key):
    def hook(_module, _args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output
        store[key] = store.get(key, 0) + hidden.shape[0]

    return module.register_forward_hook(hook)


# ---------------------------------------------------------------- shapes, loss, gradients


def test_forward_gives_logits_router_outputs_and_finite_loss(tiny_config, processor):
    model = build_model(tiny_config)
    inputs = make_inputs(processor, TEXTS, two_clips())
    out = model(**inputs, labels=lm_labels(inputs, tiny_config.audio_token_id))
    batch, seq = inputs["input_ids"].shape
    assert out.logits.shape == (batch, seq, tiny_config.text_config.vocab_size)
    assert out.router_logits.shape == (2, 2, 4)  # windows, routers (independent, dependent), pool
    assert out.router_indices.shape == (2, 2, tiny_config.router_top_k)
    assert out.router_aux_loss.ndim == 0 and torch.isfinite(out.router_aux_loss)
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("num_items_in_batch", [None, 0], ids=["mean", "trainer_count_of_zero"])
def test_a_batch_without_answer_tokens_gives_a_finite_loss_and_no_lm_gradient(
    fast_config, processor, num_items_in_batch
):
    # Every label -100 (no answer, or one cut away): the token-mean is 0/0, which must not become a NaN that one
    # optimizer step would spread into every weight. The balancing loss still counts.
    model = build_model(fast_config)
    inputs = make_inputs(processor, TEXTS, two_clips())
    labels = torch.full_like(inputs["input_ids"], -100)
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    out = model(**inputs, labels=labels, **extra)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, fast_config.router_aux_loss_coef * out.router_aux_loss)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(grad).all() for grad in grads.values())
    assert not model.lm_head.weight.grad.any()


def test_the_loss_is_the_mean_over_answer_tokens(fast_config, processor):
    model = build_model(fast_config)
    model.config.router_aux_loss_coef = 0.0
    inputs = make_inputs(processor, TEXTS, two_clips())
    labels = lm_labels(inputs, fast_config.audio_token_id)
    labels[0, :-2] = -100  # row 0 keeps one answer token, row 1 all of its text
    out = model(**inputs, labels=labels)
    expected = nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)


def test_backward_reaches_routers_projector_and_only_selected_weak_encoders(fast_config, processor):
    model = build_model(fast_config).train()
    force_routing(model, independent=2, dependent=1)  # a HuBERT and a Whisper weak encoder
    inputs = make_inputs(processor, TEXTS, two_clips())
    model(**inputs, labels=lm_labels(inputs, fast_config.audio_token_id)).loss.backward()
    tower = model.model.audio_tower

    def grad_norm(module):
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    assert float(tower.router_independent.logits.grad.abs().sum()) > 0
    assert float(tower.router_dependent.classifier.weight.grad.abs().sum()) > 0
    assert grad_norm(model.model.multi_modal_projector) > 0
    for selected in (1, 2):
        assert grad_norm(tower.weak_encoders[selected]) > 0
        assert grad_norm(tower.weak_projections[selected]) > 0
    for unselected in (0, 3):  # present for DDP, but exactly zero: they did no real compute
        assert grad_norm(tower.weak_encoders[unselected]) == 0
        assert grad_norm(tower.weak_projections[unselected]) == 0


@pytest.mark.parametrize("forced", [True, False], ids=["forced_routing", "learned_routing"])
def test_only_selected_weak_encoders_run_on_their_rows(tiny_config, processor, forced):
    model = build_model(tiny_config, seed=3)
    if forced:
        force_routing(model, independent=3, dependent=0)
    tower = model.model.audio_tower
    rows: dict[int, int] = {}
    handles = [count_rows(enc, rows, i) for i, enc in enumerate(tower.weak_encoders)]
    clips = [make_clip(s, seed=i) for i, s in enumerate((0.6, 1.2, 2.1, 0.9))]
    texts = [f"clip {i}: <|audio|>" for i in range(4)]
    with torch.no_grad():
        out = model(**make_inputs(processor, texts, clips))
    for h in handles:
        h.remove()
    expected = {e: len(r) for e, r in selected_windows(out.router_indices).items()}
    if forced:
        assert expected == {3: 4, 0: 4}
    assert rows == expected
    assert sum(rows.values()) <= 2 * len(clips)  # at most top_k per router per clip, never the whole pool


# ---------------------------------------------------------------- load balancing


def test_load_balancing_loss_is_n_sum_f_times_p_on_a_hand_made_case():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    index = torch.tensor([[0], [1], [0], [2]])
    # f = [2/4, 1/4, 1/4], P = [0.375, 0.3125, 0.3125]; L = 3 * (0.1875 + 0.078125 + 0.078125)
    assert load_balancing_loss(probs, index).item() == pytest.approx(1.03125, abs=1e-6)
    # top-2: slots [0,1],[1,2],[0,1],[2,0] -> f = [3/8, 3/8, 2/8]
    index2 = torch.tensor([[0, 1], [1, 2], [0, 1], [2, 0]])
    expected = 3 * (3 / 8 * 0.375 + 3 / 8 * 0.3125 + 2 / 8 * 0.3125)
    assert load_balancing_loss(probs, index2).item() == pytest.approx(expected, abs=1e-6)
    uniform = torch.full((4, 4), 0.25)
    assert load_balancing_loss(uniform, torch.arange(4)[:, None]).item() == pytest.approx(1.0)
    collapsed = torch.nn.functional.one_hot(torch.zeros(5, dtype=torch.long), 4).float()
    assert load_balancing_loss(collapsed, torch.zeros(5, 1, dtype=torch.long)).item() == pytest.approx(4.0)


def test_model_router_aux_loss_matches_formula_on_its_router_logits(fast_config, processor):
    model = build_model(fast_config, seed=5)
    clips = [make_clip(s, seed=i) for i, s in enumerate((0.6, 1.2, 2.1))]
    with torch.no_grad():
        out = model(**make_inputs(processor, [f"<|audio|> {i}" for i in range(3)], clips))
    dependent = fast_config.active_routers.index("data_dependent")
    probs = out.router_logits[:, dependent].softmax(-1)
    fraction = torch.nn.functional.one_hot(out.router_indices[:, dependent, 0], 4).float().mean(0)
    expected = 4 * (fraction * probs.mean(0)).sum()
    torch.testing.assert_close(out.router_aux_loss, expected)
    torch.testing.assert_close(out.router_aux_loss, load_balancing_loss(probs, out.router_indices[:, dependent]))


def _user_loop_loss(model, inputs, labels):
    """A loss computed from the logits, plus the balancing loss the outputs carry (as in transformers' MoE models)."""
    out = model(**inputs)
    lm_loss = nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    return lm_loss + model.config.router_aux_loss_coef * out.router_aux_loss


def _model_loss(model, inputs, labels):
    return model(**inputs, labels=labels).loss


@pytest.mark.parametrize("loss_fn", [_model_loss, _user_loop_loss], ids=["model_loss", "user_loop"])
def test_router_gradients_scale_with_the_loss_and_hold_the_balancing_loss_once(fast_config, processor, loss_fn):
    """`(s * loss).backward()` gives s times the router gradients of `loss.backward()`: gradient accumulation's 1/n
    and fp16 loss scaling's S scale the balancing term like the LM term. Its share is `coef * d(aux)`, once."""
    model = build_model(fast_config, seed=7).train()
    clips = [make_clip(s, seed=i) for i, s in enumerate((0.6, 1.4, 2.0))]
    inputs = make_inputs(processor, [f"Describe <|audio|> now {i}" for i in range(3)], clips)
    labels = lm_labels(inputs, fast_config.audio_token_id)
    router = model.model.audio_tower.router_dependent.classifier
    params = [router.weight, router.bias]

    def router_grads(scale: float, coef: float) -> list[torch.Tensor]:
        model.config.router_aux_loss_coef = coef  # read at every forward
        model.zero_grad()
        torch.manual_seed(0)  # the same sampled routing in every forward
        (scale * loss_fn(model, inputs, labels)).backward()
        return [p.grad.clone() for p in params]

    unscaled = router_grads(1.0, 0.5)
    for scale in (0.25, 1024.0):
        for scaled, reference in zip(router_grads(scale, 0.5), unscaled):
            torch.testing.assert_close(scaled, scale * reference, atol=1e-6 * scale, rtol=1e-4)
    torch.manual_seed(0)
    tower_out = model.model.audio_tower(inputs["input_features"], inputs["input_values"], inputs["audio_lengths"])
    aux_grads = torch.autograd.grad(tower_out.router_aux_loss, params)
    assert any(float(g.abs().max()) > 1e-4 for g in aux_grads)
    for with_aux, without, aux in zip(unscaled, router_grads(1.0, 0.0), aux_grads):
        torch.testing.assert_close(with_aux - without, 0.5 * aux, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- padding, batching, generation


@pytest.mark.parametrize("dynamic", [False, True], ids=["whisper_30s", "dynamic_length"])
def test_padded_batch_gives_the_same_logits_as_each_row_alone(tiny_config, processor, dynamic):
    tiny_config.dynamic_audio_length = dynamic
    model = build_model(tiny_config, seed=11)
    clips = [make_clip(0.6, seed=1), make_clip(2.5, seed=2, kind="sine"), make_clip(1.1, seed=3)]
    texts = ["<|audio|>", "A much longer prompt about the sound: <|audio|> what is it?", "Q: <|audio|> A:"]
    with torch.no_grad():
        batch_inputs = make_inputs(processor, texts, clips, padding_side="right")
        batch = model(**batch_inputs).logits
        for row, (text, clip) in enumerate(zip(texts, clips)):
            alone = model(**make_inputs(processor, [text], [clip])).logits[0]
            valid = batch_inputs["attention_mask"][row].bool()
            assert int(valid.sum()) == alone.shape[0]
            torch.testing.assert_close(batch[row, valid], alone, atol=1e-5, rtol=1e-4)


def test_window_summary_adds_each_windows_mean_and_spread_to_its_tokens_whatever_the_batch(tiny_config, processor):
    """`projector_window_summary`: every audio token of a window gets a linear map of that window's mean and
    standard deviation over its valid frames (padding and batch-mates excluded), before the activation."""
    from modeling_mowe.modeling_mowe import window_statistics

    tiny_config.dynamic_audio_length = True
    tiny_config.projector_window_summary = True
    model = build_model(tiny_config, seed=12)
    projector = model.model.multi_modal_projector
    frames = torch.randn(2, 9, 5)
    statistics = window_statistics(frames, torch.tensor([6, 9]))
    for window, valid in enumerate((6, 9)):
        mine = frames[window, :valid]
        expected = torch.cat([mine.mean(0), (mine.var(0, unbiased=False) + 1e-6).sqrt()])
        torch.testing.assert_close(statistics[window], expected)

    clips = [make_clip(0.6, seed=1), make_clip(2.5, seed=2, kind="sine")]
    texts = ["<|audio|>", "Q: <|audio|> what is it?"]
    with torch.no_grad():
        batch_inputs = make_inputs(processor, texts, clips)
        batch = model(**batch_inputs).logits
        for row, (text, clip) in enumerate(zip(texts, clips)):
            alone = model(**make_inputs(processor, [text], [clip])).logits[0]
            valid = batch_inputs["attention_mask"][row].bool()
            torch.testing.assert_close(batch[row, valid], alone, atol=1e-5, rtol=1e-4)
        projector.window_summary.weight.zero_()
        projector.window_summary.bias.zero_()
        without = model(**batch_inputs).logits
    assert not torch.allclose(batch, without, atol=1e-4)  # the summary reaches the answer
    tiny_config.projector_window_summary = False
    plain = build_model(tiny_config, seed=12)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "window_summary" not in k})
    with torch.no_grad():  # zero summary weights: exactly the projector without one
        torch.testing.assert_close(plain(**batch_inputs).logits, without, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_batched_generate_gives_the_same_tokens_as_each_row_alone(fast_config, processor, family):
    model = build_model(_config_with_text_model(fast_config, family), seed=13)
    clips = [make_clip(0.8, seed=1), make_clip(2.2, seed=2, kind="sine")]
    texts = ["<|audio|>", "Please describe this sound in detail: <|audio|> Answer:"]
    gen = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None, "pad_token_id": 1}
    batch_inputs = make_inputs(processor, texts, clips, padding_side="left")
    assert (batch_inputs["attention_mask"][0] == 0).any()  # row 0 is really left-padded
    prompt_len = batch_inputs["input_ids"].shape[1]
    batch = model.generate(**batch_inputs, **gen)[:, prompt_len:]
    for row, (text, clip) in enumerate(zip(texts, clips)):
        inputs = make_inputs(processor, [text], [clip], padding_side="left")
        alone = model.generate(**inputs, **gen)[0, inputs["input_ids"].shape[1] :]
        assert batch[row].tolist() == alone.tolist()


def test_generate_with_cache_gives_the_same_tokens_as_without(fast_config, processor):
    model = build_model(fast_config, seed=17)
    inputs = make_inputs(processor, TEXTS, two_clips(), padding_side="left")
    gen = {"max_new_tokens": 5, "do_sample": False, "eos_token_id": None, "pad_token_id": 1}
    cached = model.generate(**inputs, use_cache=True, **gen)
    uncached = model.generate(**inputs, use_cache=False, **gen)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 5
    assert torch.equal(cached, uncached)


def test_generate_continues_from_a_returned_cache_with_the_tokens_of_a_fresh_generate(fast_config, processor):
    # A conversation goes on: the first answer's cache is passed back with the whole conversation so far (audio
    # included, as the processor gives it) plus a follow-up question; the audio is not encoded again.
    model = build_model(fast_config, seed=17)
    inputs = make_inputs(processor, TEXTS, two_clips(), padding_side="left")
    gen = {"do_sample": False, "eos_token_id": None, "pad_token_id": 1}
    first = model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True, **gen)
    follow_up = torch.tensor([[7, 8, 9]] * 2)
    continued = dict(inputs)
    continued["input_ids"] = torch.cat([first.sequences, follow_up], dim=1)
    new_tokens = continued["input_ids"].shape[1] - inputs["input_ids"].shape[1]
    continued["attention_mask"] = nn.functional.pad(inputs["attention_mask"], (0, new_tokens), value=1)
    fresh = model.generate(**continued, max_new_tokens=4, **gen)
    calls = []
    model.model.audio_tower.register_forward_hook(lambda *_: calls.append(1))
    from_cache = model.generate(**continued, past_key_values=first.past_key_values, max_new_tokens=4, **gen)
    assert torch.equal(from_cache, fresh)
    assert calls == []


@pytest.mark.parametrize("assistant", ["itself", "another_mowe"])
def test_assisted_decoding_with_a_mowe_assistant_gives_the_greedy_tokens(fast_config, processor, assistant):
    # The same model as assistant accepts every candidate, a differently initialised one rejects most of them.
    model = build_model(fast_config, seed=17)
    helper = model if assistant == "itself" else build_model(fast_config, seed=3)
    helper.generation_config.num_assistant_tokens = 2
    helper.generation_config.num_assistant_tokens_schedule = "constant"
    inputs = make_inputs(processor, TEXTS[1:], two_clips()[1:])
    gen = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None, "pad_token_id": 1}
    greedy = model.generate(**inputs, **gen)
    assisted = model.generate(**inputs, assistant_model=helper, **gen)
    assert torch.equal(assisted, greedy)


def test_generate_encodes_audio_once_with_cache(fast_config, processor):
    model = build_model(fast_config)
    calls = []
    model.model.audio_tower.register_forward_hook(lambda *_: calls.append(1))
    inputs = make_inputs(processor, TEXTS, two_clips(), padding_side="left")
    model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=1)
    assert len(calls) == 1


# ---------------------------------------------------------------- training features


def test_gradient_checkpointing_gives_the_same_loss_and_grads(fast_config, processor):
    model = build_model(fast_config, seed=19).train()
    inputs = make_inputs(processor, TEXTS, two_clips())
    labels = lm_labels(inputs, fast_config.audio_token_id)

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(0)  # the same sampled routing
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    assert model.model.language_model.layers[0].gradient_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads()
    torch.testing.assert_close(ckpt_loss, loss)
    assert ckpt_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


@contextlib.contextmanager
def one_rank_process_group(folder: Path):
    """A one-rank gloo process group, as `torchrun` / `accelerate launch` set one up before the first training step."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def process_group(tmp_path):
    with one_rank_process_group(tmp_path):
        yield


def picked_forced_step(config, processor):
    """A training step with the data-independent router on weak encoder 2 and the data-dependent one on 2 too: the
    model, its loss, and the rows each weak encoder ran on."""
    model = build_model(config).train()
    force_routing(model, independent=2, dependent=2)  # weak encoders 0, 1, 3 get no rows
    tower = model.model.audio_tower
    rows: dict[int, int] = {}
    handles = [count_rows(enc, rows, i) for i, enc in enumerate(tower.weak_encoders)]
    inputs = make_inputs(processor, TEXTS, two_clips())
    loss = model(**inputs, labels=lm_labels(inputs, config.audio_token_id)).loss
    loss.backward()
    for handle in handles:
        handle.remove()
    return model, loss.detach(), rows


def test_under_a_process_group_every_weak_encoder_runs_in_training_and_unpicked_ones_get_zero_grads(
    fast_config, processor, process_group
):
    """What DDP with find_unused_parameters=False and FSDP2 units inside the pool need: in a training step every weak
    encoder is called once, an unpicked one on a short piece of one window, and every trainable parameter gets a
    gradient, exactly zero for the unpicked encoders."""
    model, _, rows = picked_forced_step(fast_config, processor)
    assert rows == {0: 1, 1: 1, 2: 2, 3: 1}
    tower = model.model.audio_tower
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    for unpicked in (0, 1, 3):
        assert all(
            float(p.grad.abs().max()) == 0 for p in tower.weak_encoders[unpicked].parameters() if p.requires_grad
        )
        assert all(float(p.grad.abs().max()) == 0 for p in tower.weak_projections[unpicked].parameters())
    assert any(float(p.grad.abs().max()) > 0 for p in tower.weak_encoders[2].parameters() if p.requires_grad)


def test_one_process_trains_sparse_with_the_same_loss_and_gradients(fast_config, processor, tmp_path):
    """Without a process group no other rank needs the idle calls: the unpicked weak encoders do not run and get no
    gradient (`None`: the optimizer skips them), and every other gradient and the loss equal the process group's."""
    sparse_model, sparse_loss, rows = picked_forced_step(fast_config, processor)
    assert rows == {2: 2}
    tower = sparse_model.model.audio_tower
    for unpicked in (0, 1, 3):
        assert all(p.grad is None for p in tower.weak_encoders[unpicked].parameters())
        assert all(p.grad is None for p in tower.weak_projections[unpicked].parameters())

    with one_rank_process_group(tmp_path):
        model, loss, rows = picked_forced_step(fast_config, processor)
    assert rows == {0: 1, 1: 1, 2: 2, 3: 1}
    assert torch.equal(sparse_loss, loss)
    sparse_grads = dict(sparse_model.named_parameters())
    for name, param in model.named_parameters():
        if sparse_grads[name].grad is not None:
            assert torch.equal(sparse_grads[name].grad, param.grad), name
        elif param.grad is not None:
            assert float(param.grad.abs().max()) == 0, name


def test_unpicked_weak_encoders_do_not_run_without_gradients_or_in_eval(fast_config, processor, process_group):
    model = build_model(fast_config).train()
    force_routing(model, independent=2, dependent=2)
    tower = model.model.audio_tower
    rows: dict[int, int] = {}
    handles = [count_rows(enc, rows, i) for i, enc in enumerate(tower.weak_encoders)]
    inputs = make_inputs(processor, TEXTS, two_clips())
    with torch.no_grad():
        model(**inputs)  # train mode without gradients: nothing to synchronise, truly sparse
    assert rows == {2: 2}
    rows.clear()
    model.eval()
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    assert rows == {2: 2}


def test_idle_calls_are_decided_by_train_and_eval_not_in_forward(fast_config, processor, tmp_path):
    """The policy is read in forward and decided at construction and by `train()` / `eval()`, which every launcher
    calls once it has set up the process group (and wrapped the model): a model built before the process group
    trains sparse until its next `train()`."""
    model = build_model(fast_config).train()
    force_routing(model, independent=2, dependent=2)
    tower = model.model.audio_tower
    rows: dict[int, int] = {}
    handles = [count_rows(enc, rows, i) for i, enc in enumerate(tower.weak_encoders)]
    inputs = make_inputs(processor, TEXTS, two_clips())
    with one_rank_process_group(tmp_path):
        assert tower.idle_calls == "never"
        model(**inputs)
        assert rows == {2: 2}
        rows.clear()
        model.train()
        assert tower.idle_calls == "in_training"
        model(**inputs)
        assert rows == {0: 1, 1: 1, 2: 2, 3: 1}
    model.eval()
    assert tower.idle_calls == "never"
    for handle in handles:
        handle.remove()


def test_idle_calls_leave_the_training_loss_unchanged(fast_config, processor, process_group):
    model = build_model(fast_config, seed=4).train()
    force_routing(model, independent=2, dependent=2)
    inputs = make_inputs(processor, TEXTS, two_clips())
    labels = lm_labels(inputs, fast_config.audio_token_id)
    loss = model(**inputs, labels=labels).loss
    with torch.no_grad():
        no_grad_loss = model(**inputs, labels=labels).loss  # no idle calls without gradients
    assert torch.equal(loss.detach(), no_grad_loss)


# ---------------------------------------------------------------- persistence


@pytest.mark.parametrize("window_summary", [False, True], ids=["projector", "projector_with_window_summary"])
def test_save_and_load_round_trip_is_bit_exact_with_safetensors(tiny_config, processor, tmp_path, window_summary):
    tiny_config.projector_window_summary = window_summary
    model = build_model(tiny_config, seed=23)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert {"configuration_mowe.py", "modeling_mowe.py", "encoders.py", "routing.py"} <= files
    loaded = MoWEForConditionalGeneration.from_pretrained(tmp_path).eval()
    for m in (model, loaded):  # the tiny Llama ties its LM head to its embeddings, and so does the MoWE model
        assert m.lm_head.weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    assert any("window_summary" in key for key in loaded_state) == window_summary
    for key in original_state:
        assert torch.equal(original_state[key], loaded_state[key]), key
    inputs = make_inputs(processor, TEXTS, two_clips())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


# ---------------------------------------------------------------- the base-only ablation


def test_router_none_builds_no_pool_and_equals_a_plain_single_encoder_model(tiny_config, processor):
    tiny_config.router_type = "none"
    model = build_model(tiny_config, seed=29)
    names = [n for n, _ in model.named_parameters()]
    assert not any("weak" in n or "router" in n for n in names)
    assert len(model.model.audio_tower.weak_encoders) == 0

    inputs = make_inputs(processor, TEXTS, two_clips())
    with torch.no_grad():
        logits = model(**inputs).logits
        # The same data flow by hand: WhisperEncoder -> stack 4 valid frames -> MLP -> placeholders -> LLM -> head.
        encoder = model.model.audio_tower.base_encoder
        projector = model.model.multi_modal_projector
        hidden = encoder(input_features=inputs["input_features"][:, :128]).last_hidden_state
        tokens = []
        for window, length in zip(hidden, inputs["audio_lengths"].tolist()):
            frames = window[: (length // 160 + 1) // 2]
            frames = nn.functional.pad(frames, (0, 0, 0, -frames.shape[0] % 4)).reshape(-1, 4 * frames.shape[-1])
            tokens.append(projector.linear_2(nn.functional.gelu(projector.linear_1(frames))))
        tokens = torch.cat(tokens)
        embeds = model.get_input_embeddings()(inputs["input_ids"]).clone()
        embeds[inputs["input_ids"] == tiny_config.audio_token_id] = tokens
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
        expected = model.lm_head(hidden.last_hidden_state)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "change, message",
    [
        ({"router_top_k": 5}, r"router_top_k=5 must be between 1 and the pool size \(4\)"),
        ({"weak_encoder_configs": [BertConfig()]}, r"model_type='bert'.*not a supported audio encoder family"),
        ({"weak_encoder_configs": [], "router_type": "both"}, r"needs weak encoders.*router_type='none'"),
        ({"router_type": "sparse"}, r"router_type='sparse' is not one of"),
    ],
    ids=["top_k_above_pool", "unknown_family", "empty_pool_with_router", "bad_router_type"],
)
def test_nonsense_configs_raise_a_helpful_value_error(tiny_config, change, message):
    kwargs = {
        "base_encoder_config": tiny_config.base_encoder_config,
        "weak_encoder_configs": tiny_config.weak_encoder_configs,
        "text_config": tiny_config.text_config,
        "audio_token_id": tiny_config.audio_token_id,
        **change,
    }
    with pytest.raises(ValueError, match=message):
        MoWEConfig(**kwargs)


def test_placeholder_count_mismatch_raises_a_clear_value_error(tiny_config, processor):
    model = build_model(tiny_config)
    inputs = make_inputs(processor, TEXTS, two_clips())
    ids = inputs["input_ids"]
    first = (ids[0] == tiny_config.audio_token_id).nonzero()[0, 0]
    ids[0, first] = 7  # one audio token too few
    with pytest.raises(ValueError, match=r"audio placeholder tokens but the audio gives \d+ audio embeddings"):
        model(**inputs)


# ---------------------------------------------------------------- any causal LM


def _text_config(family: str, tiny_config):
    """A tiny LLM config of `family` with the tiny tokenizer's vocabulary (640) and ids."""
    if family == "llama":
        return copy.deepcopy(tiny_config.text_config)
    common = {"vocab_size": 640, "tie_word_embeddings": True, "pad_token_id": 1, "eos_token_id": 3}
    if family == "qwen2":
        return Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            **common,
        )
    if family == "gpt2":  # learned absolute positions: left padding needs position_ids from the attention mask
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024, bos_token_id=1, **common)
    raise ValueError(family)


def _config_with_text_model(tiny_config, family):
    return MoWEConfig(
        base_encoder_config=tiny_config.base_encoder_config,
        weak_encoder_configs=tiny_config.weak_encoder_configs,
        text_config=_text_config(family, tiny_config),
        audio_token_id=tiny_config.audio_token_id,
        weak_hidden_size=32,
        dynamic_audio_length=tiny_config.dynamic_audio_length,
    )


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_any_causal_lm_works_as_the_text_model(fast_config, processor, family):
    config = _config_with_text_model(fast_config, family)
    model = build_model(config)
    assert model.model.language_model.config.model_type == family
    inputs = make_inputs(processor, TEXTS, two_clips(), padding_side="left")
    out = model(**inputs, labels=lm_labels(inputs, config.audio_token_id))
    assert torch.isfinite(out.loss) and out.logits.shape[-1] == 640
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=1)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)


# ---------------------------------------------------------------- paper presets and from_components


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("preset", ["mowe-llama3-8b-4x-whisper-tiny", "mowe-llama3-8b-2x-whisper-tiny-2x-hubert"])
def test_paper_presets_build_on_meta_with_the_expected_parameter_count(preset):
    config = MoWEConfig.from_pretrained(ROOT / "hub_configs" / preset)
    with torch.device("meta"):
        model = MoWEForConditionalGeneration(config)
        base = _count(WhisperEncoder(config.base_encoder_config))
        weak = [
            _count(WhisperEncoder(c) if c.model_type == "whisper" else HubertModel(c))
            for c in config.weak_encoder_configs
        ]
        llm = _count(LlamaForCausalLM(config.text_config))
    assert 6.30e8 < base < 6.40e8  # Whisper-large-v3 encoder
    for c, n in zip(config.weak_encoder_configs, weak):
        assert (7.5e6 < n < 8.5e6) if c.model_type == "whisper" else (9.3e7 < n < 9.5e7)  # tiny / HuBERT-base
    assert 8.02e9 < llm < 8.04e9  # Llama-3-8B (+1 embedding row each side for <|audio|>)

    d_b, d_w, n, s = 1280, config.weak_hidden_size, len(weak), config.stack_factor
    d_llm = config.text_config.hidden_size
    weak_widths = [c.d_model if c.model_type == "whisper" else c.hidden_size for c in config.weak_encoder_configs]
    routers = n + (d_b * n + n)
    projections = sum(d * d_w + d_w for d in weak_widths)
    d_in = (d_b + 2 * d_w) * s
    projector = d_in * d_llm + d_llm + d_llm * d_llm + d_llm
    assert _count(model) == base + sum(weak) + llm + routers + projections + projector
    assert sum(weak) / _count(model) < 0.05  # the pool adds a few percent


def test_from_components_keeps_pretrained_weights_and_appends_the_audio_token(tiny_config, tmp_path):
    torch.manual_seed(0)
    base_cfg = copy.deepcopy(tiny_config.base_encoder_config)
    whisper_cfg, hubert_cfg = (copy.deepcopy(tiny_config.weak_encoder_configs[i]) for i in (0, 2))
    text_cfg = copy.deepcopy(tiny_config.text_config)
    text_cfg.vocab_size = 640
    parts = {
        "base": WhisperForConditionalGeneration(base_cfg),
        "whisper_tiny": WhisperForConditionalGeneration(whisper_cfg),
        "hubert": HubertModel(hubert_cfg),
        "llm": LlamaForCausalLM(text_cfg),
    }
    for name, part in parts.items():
        part.save_pretrained(tmp_path / name)
    paths = {name: str(tmp_path / name) for name in parts}

    model = MoWEForConditionalGeneration.from_components(
        paths["base"], [paths["whisper_tiny"], paths["hubert"]], paths["llm"], router_type="both"
    )
    tower = model.model.audio_tower

    def assert_same(module, reference):
        ours, theirs = module.state_dict(), reference.state_dict()
        assert ours.keys() == theirs.keys()
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), key

    assert_same(tower.base_encoder, parts["base"].get_encoder())
    assert_same(tower.weak_encoders[0], parts["whisper_tiny"].get_encoder())
    assert_same(tower.weak_encoders[1], parts["hubert"])
    llm_state = parts["llm"].state_dict()
    for key, value in model.model.language_model.state_dict().items():
        reference = llm_state[f"model.{key}"]
        assert torch.equal(value[: reference.shape[0]] if key == "embed_tokens.weight" else value, reference), key

    assert model.config.component_checkpoints == {
        "base_encoder": paths["base"],
        "weak_encoders": [paths["whisper_tiny"], paths["hubert"]],
        "text_model": paths["llm"],
    }
    assert model.config.audio_token_id == 640
    assert model.get_input_embeddings().weight.shape[0] == 641
    assert model.get_output_embeddings().weight.shape[0] == 641
    assert model.config.text_config.vocab_size == 641
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied, as the LLM
    assert not any(p.is_meta for p in model.parameters())


def test_attn_implementation_reaches_every_encoder_and_the_llm(tiny_config, processor, tmp_path):
    build_model(tiny_config).save_pretrained(tmp_path)
    inputs = make_inputs(processor, ["<|audio|> Transcribe the audio."], [make_clip(1.0)])
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = MoWEForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        tower = model.model.audio_tower
        submodels = [model.model.language_model, tower.base_encoder, *tower.weak_encoders]
        assert {m.config._attn_implementation for m in submodels} == {implementation}
        with torch.no_grad():
            logits[implementation] = model(**inputs).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-4, rtol=1e-4)

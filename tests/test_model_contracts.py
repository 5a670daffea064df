"""The contracts transformers' tooling expects of every model and config (issue 9, items 2-6 and 9's model inputs)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model, make_clip, make_inputs, tiny_processor
from transformers import AutoConfig, LlamaConfig, PreTrainedConfig, WhisperConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration, MoWEModel

TEXT = ["<|audio|> Transcribe the audio."]


@pytest.fixture(scope="module")
def inputs():
    """Inputs for the dynamic-length `model` (`fast_config`)."""
    return make_inputs(tiny_processor(dynamic_audio_length=True), TEXT, [make_clip(1.0)])


@pytest.fixture
def model(fast_config):
    return build_model(fast_config)


# ---------------------------------------------------------------- 9.2: a config from its defaults


def test_config_constructs_from_defaults_as_a_base_only_model():
    for config in (MoWEConfig(), AutoConfig.for_model("mowe")):
        assert isinstance(config, MoWEConfig)
        assert config.router_type == "none" and config.weak_encoder_configs == []
        assert isinstance(config.base_encoder_config, WhisperConfig)
        assert isinstance(config.text_config, LlamaConfig)
        assert config.audio_token_id is None
    with torch.device("meta"):
        model = MoWEForConditionalGeneration(MoWEConfig())
    assert model.model.audio_tower.weak_encoders is not None and len(model.model.audio_tower.weak_encoders) == 0


def test_partial_config_dicts_fill_in_defaults():
    config = MoWEConfig.from_dict({"weak_encoder_configs": [{"model_type": "whisper"}], "text_config": {}})
    assert config.router_type == "both"  # the paper's best router, now that there is a pool
    assert isinstance(config.text_config, LlamaConfig)
    assert MoWEConfig.from_dict(config.to_dict()).to_diff_dict() == config.to_diff_dict()


def test_a_router_asked_for_without_a_pool_still_names_the_fix():
    with pytest.raises(ValueError, match=r"needs weak encoders.*router_type='none'"):
        MoWEConfig(router_type="both")


# ---------------------------------------------------------------- 9.3: declared sub-configs


def test_sub_configs_are_declared_fields_and_the_weak_pool_a_list_of_configs(tiny_config):
    assert MoWEConfig.sub_configs == {"base_encoder_config": AutoConfig, "text_config": AutoConfig}
    assert list(tiny_config.sub_configs) == ["base_encoder_config", "text_config"]
    assert all(isinstance(c, PreTrainedConfig) for c in tiny_config.weak_encoder_configs)
    assert not hasattr(tiny_config, "weak_encoder_configs.0")  # no dotted-key attributes


def test_building_a_config_leaves_the_llm_vocabulary_and_the_given_configs_alone(tiny_config):
    text_config = copy.deepcopy(tiny_config.text_config)
    for _ in range(2):
        config = MoWEConfig(base_encoder_config=tiny_config.base_encoder_config, text_config=text_config)
        config._attn_implementation = "eager"
        assert config.text_config.vocab_size == 640 and config.audio_token_id is None
    assert text_config.vocab_size == 640 and text_config._attn_implementation != "eager"


def test_attention_implementation_reaches_the_weak_encoders(model, fast_config, tmp_path):
    model.set_attn_implementation({"text_config": "eager"})
    tower = model.model.audio_tower
    assert {e.config._attn_implementation for e in tower.weak_encoders} == {"sdpa"}
    assert model.model.language_model.config._attn_implementation == "eager"
    model.set_attn_implementation("eager")
    assert {e.config._attn_implementation for e in [tower.base_encoder, *tower.weak_encoders]} == {"eager"}
    model.save_pretrained(tmp_path)
    loaded = MoWEForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    tower = loaded.model.audio_tower
    assert {e.config._attn_implementation for e in [tower.base_encoder, *tower.weak_encoders]} == {"eager"}


def test_dtype_given_to_from_pretrained_reaches_every_sub_config(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = MoWEForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    config = loaded.config
    assert {c.dtype for c in [config.text_config, *config.encoder_configs]} == {torch.bfloat16}
    tower = loaded.model.audio_tower
    assert {e.config.dtype for e in [tower.base_encoder, *tower.weak_encoders]} == {torch.bfloat16}


def test_output_hidden_states_and_attentions_set_on_the_config_reach_the_llm(fast_config, inputs):
    fast_config.output_hidden_states = True
    fast_config.output_attentions = True  # switches every sub-config to eager attention, as transformers does
    model = build_model(fast_config)
    tower = model.model.audio_tower
    assert {e.config._attn_implementation for e in [model.model.language_model, *tower.weak_encoders]} == {"eager"}
    with torch.no_grad():
        out = model(**inputs)
    layers = fast_config.text_config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    with torch.no_grad():
        assert model(**inputs, output_hidden_states=False).hidden_states is None  # a call-time flag wins


# ---------------------------------------------------------------- 9.4: tuples with return_dict=False


@pytest.mark.parametrize("how", ["call", "config"])
def test_return_dict_false_gives_tuples_of_the_same_tensors(model, inputs, how):
    with torch.no_grad():
        expected = model(**inputs)
        base = model.model(**inputs)
        if how == "config":
            model.config.return_dict = False
            outputs, base_outputs = model(**inputs), model.model(**inputs)
        else:
            outputs, base_outputs = model(**inputs, return_dict=False), model.model(**inputs, return_dict=False)
    assert isinstance(outputs, tuple) and isinstance(base_outputs, tuple)
    assert torch.equal(outputs[0], expected.logits)
    assert torch.equal(base_outputs[0], base.last_hidden_state)


# ---------------------------------------------------------------- 9.5: get_audio_features


def test_get_audio_features_returns_the_base_encoders_hidden_states_and_attentions(model, inputs):
    audio = {k: inputs.get(k) for k in ("input_features", "input_values", "audio_lengths")}
    model.set_attn_implementation("eager")
    with torch.no_grad():
        plain = model.get_audio_features(**audio)
        features = model.get_audio_features(**audio, output_hidden_states=True, output_attentions=True)
    layers = model.config.base_encoder_config.encoder_layers
    assert plain.hidden_states is None and plain.attentions is None
    assert len(features.hidden_states) == layers + 1 and len(features.attentions) == layers
    frames = features.valid_frames.max().item()
    assert features.hidden_states[-1].shape[:2] == (1, frames) and features.attentions[0].shape[-1] == frames
    torch.testing.assert_close(features.pooler_output, plain.pooler_output)


def test_get_audio_features_pooler_output_is_what_replaces_the_placeholders(model, inputs):
    audio = {k: inputs.get(k) for k in ("input_features", "input_values", "audio_lengths")}
    with torch.no_grad():
        features = model.get_audio_features(**audio)
        merged = model.model(**inputs).audio_hidden_states
        as_tuple = model.get_audio_features(**audio, return_dict=False)
    assert isinstance(features, BaseModelOutputWithPooling)
    num_tokens = int((inputs["input_ids"] == model.config.audio_token_id).sum())
    assert features.pooler_output.shape == (num_tokens, model.config.text_config.hidden_size)
    torch.testing.assert_close(features.pooler_output, merged)
    assert features.last_hidden_state.shape[:2] == (1, features.valid_frames.max().item())
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], features.last_hidden_state)


# ---------------------------------------------------------------- 9.6: device placement keys


def test_skip_keys_device_placement_names_whole_keys(model):
    assert isinstance(MoWEModel._skip_keys_device_placement, list)
    assert "past_key_values" in model._skip_keys_device_placement
    assert all(len(key) > 1 for key in model._skip_keys_device_placement)


# ---------------------------------------------------------------- 9.9: bad inputs reaching the model directly


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda x: x.update(audio_lengths=-x["audio_lengths"]), r"`audio_lengths` has negative values"),
        (lambda x: x["input_features"].view(-1)[7].fill_(float("nan")), r"`input_features` contains NaN or Inf"),
        (lambda x: x["input_values"].view(-1)[7].fill_(float("inf")), r"`input_values` contains NaN or Inf"),
        (lambda x: x.pop("audio_lengths"), r"`audio_lengths` .* is required"),
        (
            lambda x: x.update(input_features=x["input_features"][:, :80]),
            r"`input_features` has shape \(1, 80, 100\) but .* read \(num_windows, 208, frames\).*processor",
        ),
        (
            lambda x: x["input_ids"].view(-1)[-1].fill_(10**6),
            r"`input_ids` holds token ids outside the LLM's vocabulary \(0 to 639\).*resize_token_embeddings",
        ),
    ],
    ids=["negative_lengths", "nan_features", "inf_waveform", "no_lengths", "mel_bins", "token_id_past_vocab"],
)
def test_bad_audio_inputs_raise_a_value_error_naming_the_problem(model, inputs, spoil, message):
    bad = {k: v.clone() for k, v in inputs.items()}
    spoil(bad)
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(**bad)


def test_a_model_without_an_audio_token_id_says_how_to_set_it(fast_config, inputs):
    fast_config.audio_token_id = None
    with pytest.raises(ValueError, match=r"audio_token_id is not set.*processor.audio_token_id"), torch.no_grad():
        build_model(fast_config)(**inputs)

"""MoWEProcessor: placeholder expansion that agrees with the model, chat templates, pipelines, save/load, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
import torch
from conftest import SR, run_without_package, tiny_whisper
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    HubertConfig,
    HubertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    pipeline,
)

import modeling_mowe.processing_mowe as processing_mowe
from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration, MoWEProcessor
from modeling_mowe.encoders import num_audio_tokens

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "hub_configs" / "mowe-tiny-random"
PROMPT = "Transcribe the audio."


def noise(seconds: float, seed: int = 0, rate: int = SR) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


def audio_tokens_per_row(inputs, audio_token_id: int) -> list[int]:
    return (torch.as_tensor(inputs["input_ids"]) == audio_token_id).sum(-1).tolist()


def chat(*parts, role: str = "user") -> list[dict]:
    return [{"role": role, "content": list(parts)}]


@pytest.fixture(scope="module")
def processor() -> MoWEProcessor:
    return MoWEProcessor.from_pretrained(TINY)


@pytest.fixture(scope="module")
def config() -> MoWEConfig:
    return MoWEConfig.from_pretrained(TINY, dynamic_audio_length=True)


@pytest.fixture(scope="module")
def model(config) -> MoWEForConditionalGeneration:
    torch.manual_seed(0)
    return MoWEForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, processor, model) -> Path:
    """A tiny random model and its processor saved as a Hub checkpoint would be (code included)."""
    folder = tmp_path_factory.mktemp("mowe-tiny-saved")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ---- placeholder expansion: the processor and the model never disagree ------------------------------------------


def test_audio_token_matches_the_model_config(processor, config):
    assert processor.audio_token == "<|audio|>"
    assert processor.audio_token_id == config.audio_token_id == processor.tokenizer.convert_tokens_to_ids("<|audio|>")
    assert processor.frame_spec == config.audio_frame_spec
    assert processor.stack_factor == config.stack_factor


def test_placeholder_count_equals_the_audio_embeddings_the_model_produces(processor, model):
    seconds = [0.001, 0.37, 1.0, 3.3, 31.0]
    clips = [noise(s, seed=i) for i, s in enumerate(seconds)]
    texts = [f"{PROMPT} <|audio|>", "<|audio|>", "<|audio|> then <|audio|>", "<|audio|>?"]
    inputs = processor(text=texts, audio=clips, sampling_rate=SR, return_tensors="pt")
    with torch.no_grad():
        audio_embeds = model.model(**inputs).audio_hidden_states  # raises if the placeholders and embeddings differ
    per_row = audio_tokens_per_row(inputs, processor.audio_token_id)
    assert sum(per_row) == audio_embeds.shape[0]
    expected = [processor.num_audio_tokens(len(c)) for c in clips]
    assert per_row == [expected[0], expected[1], expected[2] + expected[3], expected[4]]
    assert expected == [1, 5, 13, 42, 375 + 13]
    assert processor.num_audio_tokens(int(29.99 * SR)) == processor.num_audio_tokens(30 * SR) == 375


def test_expansion_goes_through_encoders_num_audio_tokens(processor, config, monkeypatch):
    calls = []

    def spy(num_samples, spec, stack_factor):
        calls.append((num_samples, spec, stack_factor))
        return num_audio_tokens(num_samples, spec, stack_factor)

    monkeypatch.setattr(processing_mowe, "num_audio_tokens", spy)
    inputs = processor(text="<|audio|>", audio=noise(70.0), sampling_rate=SR)
    assert calls == [(n, config.audio_frame_spec, config.stack_factor) for n in (480_000, 480_000, 160_000)]
    assert audio_tokens_per_row(inputs, processor.audio_token_id) == [375 + 375 + 125]


def test_long_clip_gives_one_row_per_window_in_order_and_the_sum_of_their_tokens(processor):
    clip = noise(70.0, seed=1)
    inputs = processor(
        text=["<|audio|>", "<|audio|>"], audio=[noise(2.0), clip], sampling_rate=SR, return_tensors="pt"
    )
    assert inputs["audio_lengths"].tolist() == [32_000, 480_000, 480_000, 160_000]
    windows = [
        processor(text="<|audio|>", audio=clip[s : s + 480_000], sampling_rate=SR) for s in (0, 480_000, 960_000)
    ]
    for row, window in zip(range(1, 4), windows):
        np.testing.assert_allclose(inputs["input_features"][row].numpy(), window["input_features"][0], atol=1e-5)
    assert audio_tokens_per_row(inputs, processor.audio_token_id)[1] == sum(
        audio_tokens_per_row(w, processor.audio_token_id)[0] for w in windows
    )


def test_a_3_s_clip_takes_at_most_0_12x_the_tokens_of_a_30_s_clip(processor):
    assert processor.num_audio_tokens(3 * SR) / processor.num_audio_tokens(30 * SR) <= 0.12


# ---- __call__ -------------------------------------------------------------------------------------------------


def test_batched_text_is_padded_left_without_asking(processor):
    assert processor.tokenizer.padding_side == "left"
    inputs = processor(
        text=["<|audio|> hi", f"{PROMPT} <|audio|> and more words here"],
        audio=[noise(1.0), noise(1.0, seed=1)],
        sampling_rate=SR,
        return_tensors="pt",
    )
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape and inputs["input_ids"].shape[0] == 2
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][:, -1].all()
    assert (inputs["input_ids"][0][inputs["attention_mask"][0] == 0] == processor.tokenizer.pad_token_id).all()
    unpadded = processor(text=["a", "a b c"], padding=False)
    assert len(unpadded["input_ids"][0]) < len(unpadded["input_ids"][1])


def test_a_tokenizers_saved_padding_defaults_stand_unless_the_call_overrides_them(processor, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(TINY, padding="max_length", max_length=300)
    to_save = MoWEProcessor(processor.feature_extractor, tokenizer, chat_template=processor.chat_template)
    to_save.save_pretrained(tmp_path)
    saved = MoWEProcessor.from_pretrained(tmp_path)
    one = saved(text="<|audio|> hi", audio=noise(0.5), sampling_rate=SR, return_tensors="pt")
    two = saved(text=["<|audio|> hi", "hello"], audio=[noise(0.5)], sampling_rate=SR, return_tensors="pt")
    assert one["input_ids"].shape == (1, 300) and two["input_ids"].shape == (2, 300)
    assert one["attention_mask"].sum() == (one["input_ids"] != tokenizer.pad_token_id).sum() < 300
    overridden = saved(text=["<|audio|> hi", "hello"], audio=[noise(0.5)], sampling_rate=SR, padding="longest")
    assert max(len(ids) for ids in overridden["input_ids"]) < 300


def test_batch_gives_each_row_what_it_gives_alone(processor):
    texts = ["<|audio|> hi", f"{PROMPT} <|audio|>", "no audio here"]
    clips = [noise(0.4, seed=2), noise(2.5, seed=3)]
    batch = processor(text=texts, audio=clips, sampling_rate=SR, return_tensors="pt")
    singles = [
        processor(text=texts[0], audio=clips[0], sampling_rate=SR),
        processor(text=texts[1], audio=clips[1], sampling_rate=SR),
        processor(text=texts[2]),
    ]
    for row, single in enumerate(singles):
        assert batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist() == single["input_ids"][0]
    for row, single in enumerate(singles[:2]):
        np.testing.assert_allclose(batch["input_features"][row].numpy(), single["input_features"][0], atol=1e-5)
        assert batch["audio_lengths"][row] == single["audio_lengths"][0]


def test_audio_only_and_text_only_calls(processor):
    features = processor(audio=noise(1.0), sampling_rate=SR, return_tensors="pt")
    assert set(features) == {"input_features", "input_values", "audio_lengths"}
    text = processor(text="hello", return_tensors="pt")
    assert set(text) == {"input_ids", "attention_mask"}
    assert processor.model_input_names == [
        "input_ids",
        "attention_mask",
        "audio_lengths",
        "input_features",
        "input_values",
    ]


def test_every_accepted_audio_form_gives_the_same_inputs(processor, tmp_path):
    clip44 = noise(0.6, seed=4, rate=44_100)
    path = tmp_path / "clip.flac"
    soundfile.write(path, clip44, 44_100, subtype="PCM_24")
    data, _ = soundfile.read(path, dtype="float32")
    reference = processor(text="<|audio|>", audio=data, sampling_rate=44_100)
    for form, rate in [
        (str(path), None),
        (path, None),
        ({"array": data, "sampling_rate": 44_100}, None),
        ({"bytes": path.read_bytes(), "path": None}, None),
        (torch.from_numpy(data), 44_100),
        (np.stack([data, data], axis=1), 44_100),
        (soxr.resample(data, 44_100, SR), SR),
    ]:
        out = processor(text="<|audio|>", audio=[form], sampling_rate=rate)
        assert out["input_ids"] == reference["input_ids"]
        np.testing.assert_allclose(out["input_features"], reference["input_features"], atol=1e-4)


# ---- bad input: a clear error before any model work -------------------------------------------------------------


@pytest.mark.parametrize(
    "texts, clips, message",
    [
        (
            ["<|audio|> one"],
            [noise(0.1), noise(0.1)],
            "2 audio clips were given but the text has 1 <|audio|> placeholder;",
        ),
        (["<|audio|> <|audio|>"], [noise(0.1)], "1 audio clip was given but the text has 2 <|audio|> placeholders;"),
        (["<|audio|>"], None, "0 audio clips were given but the text has 1 <|audio|> placeholder;"),
        (["no placeholder"], [noise(0.1)], "1 audio clip was given but the text has 0 <|audio|> placeholders;"),
        (
            ["<|audio|>", "<|audio|>", "x"],
            [noise(0.1)] * 3,
            "3 audio clips were given but the text has 2 <|audio|> placeholders;",
        ),
    ],
)
def test_clip_and_placeholder_counts_must_match(processor, texts, clips, message):
    with pytest.raises(ValueError, match="^" + message.replace("|", r"\|") + " put one <\\|audio\\|> in the text"):
        processor(text=texts, audio=clips, sampling_rate=SR)


def test_count_is_checked_before_any_audio_is_read(processor):
    with pytest.raises(ValueError, match="2 audio clips were given but the text has 1"):
        processor(text="<|audio|>", audio=["/does/not/exist.wav", "/nor/this.wav"])


def test_a_2_d_array_for_a_batch_gets_a_hint(processor):
    with pytest.raises(ValueError, match=r"shape \(4, 16000\) is one multi-channel clip; for a batch, pass a list"):
        processor(text=["<|audio|>"] * 4, audio=np.zeros((4, SR), np.float32), sampling_rate=SR)


@pytest.mark.parametrize(
    "audio, rate, error, match",
    [
        (noise(0.1), None, ValueError, "without its sampling rate"),
        (noise(0.1), 0, ValueError, "sampling_rate must be a positive number"),
        (noise(0.1), -8000, ValueError, "sampling_rate must be a positive number"),
        (np.zeros(0, np.float32), SR, ValueError, "Empty audio clip"),
        (np.array([0.0, np.nan], np.float32), SR, ValueError, "NaN/Inf samples"),
        (np.zeros((2, 3, 100), np.float32), SR, ValueError, r"1-D \(mono\) or 2-D"),
        ({"label": 3}, SR, ValueError, "An audio dict needs 'array'"),
        ("nope.wav", SR, ValueError, "does not exist"),
        (object(), SR, TypeError, "Expected audio as"),
    ],
)
def test_bad_audio_raises_before_tokenising(processor, audio, rate, error, match, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the tokenizer ran before the audio was checked")

    monkeypatch.setattr(type(processor.tokenizer), "__call__", fail)
    with pytest.raises(error, match=match):
        processor(text="<|audio|>", audio=audio, sampling_rate=rate)


def test_bad_audio_in_a_batch_names_the_clip(processor):
    with pytest.raises(ValueError, match="^Audio clip 1: Empty audio clip"):
        processor(text=["<|audio|>", "<|audio|>"], audio=[noise(0.1), np.zeros(0)], sampling_rate=SR)


def test_bad_text_and_other_modalities(processor):
    with pytest.raises(TypeError, match="`text` must be a string or a list of strings"):
        processor(text=42)
    with pytest.raises(ValueError, match="audio and text only; `images`"):
        processor(text="hi", images=np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="Give `text`"):
        processor()


def test_truncation_that_would_cut_audio_tokens_is_refused(processor):
    with pytest.raises(ValueError, match="Mismatch in `audio` token count"):
        processor(text="<|audio|> words", audio=noise(1.0), sampling_rate=SR, truncation=True, max_length=5)


# ---- chat template ------------------------------------------------------------------------------------------------


def test_chat_renders_each_audio_part_as_one_placeholder(processor):
    messages = chat({"type": "audio", "audio": noise(0.5), "sampling_rate": SR}, {"type": "text", "text": PROMPT})
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == f"<|im_start|>user\n<|audio|>{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    as_string = [{"role": "user", "content": f"<|audio|>{PROMPT}"}]
    assert processor.tokenizer.apply_chat_template(as_string, tokenize=False, add_generation_prompt=True) == rendered
    assert processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered
    history = messages + [{"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]
    assert processor.apply_chat_template(history).endswith("<|im_start|>assistant\nhello<|im_end|>\n")
    prefill = processor.apply_chat_template(history, continue_final_message=True)
    assert prefill.endswith("<|im_start|>assistant\nhello")


def test_chat_with_array_and_path_parts_feeds_forward_and_generate(processor, model, tmp_path):
    path = tmp_path / "second.wav"
    second = noise(1.2, seed=5, rate=22_050)
    soundfile.write(path, second, 22_050, subtype="FLOAT")
    first = noise(0.8, seed=6)
    messages = chat(
        {"type": "audio", "audio": first, "sampling_rate": SR},
        {"type": "text", "text": "Compare with"},
        {"type": "audio", "path": str(path)},
        {"type": "text", "text": PROMPT},
    )
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    direct = processor(
        text=rendered, audio=[first, soxr.resample(second, 22_050, SR)], sampling_rate=SR, add_special_tokens=False
    )
    assert inputs["input_ids"][0].tolist() == direct["input_ids"][0]
    np.testing.assert_allclose(inputs["input_features"].numpy(), direct["input_features"], atol=1e-5)
    assert audio_tokens_per_row(inputs, processor.audio_token_id) == [
        processor.num_audio_tokens(len(first)) + processor.num_audio_tokens(int(1.2 * SR))
    ]
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    ids_only = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_tensors="pt")
    assert torch.equal(ids_only, inputs["input_ids"])


def test_batched_chats_are_padded_and_generate(processor, model):
    conversations = [
        chat({"type": "audio", "audio": noise(0.5, seed=7), "sampling_rate": SR}, {"type": "text", "text": PROMPT}),
        chat(
            {"type": "text", "text": "Two clips:"},
            {"type": "audio", "audio": {"array": noise(2.0, seed=8, rate=8_000), "sampling_rate": 8_000}},
            {"type": "audio", "audio": noise(0.3, seed=9), "sampling_rate": SR},
            {"type": "text", "text": "Is the speaker male or female?"},
        ),
    ]
    inputs = processor.apply_chat_template(
        conversations, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    assert inputs["input_ids"].shape[0] == 2 and inputs["audio_lengths"].tolist() == [8_000, 32_000, 4_800]
    assert inputs["attention_mask"][0, 0] == 0  # left padding
    for row, conversation in enumerate(conversations):
        alone = processor.apply_chat_template(
            conversation, tokenize=True, return_dict=True, add_generation_prompt=True
        )
        assert inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist() == alone["input_ids"][0]
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    texts = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True) == texts[0]


def test_chat_audio_rates_and_clips_given_separately(processor):
    clip = noise(0.5, seed=10, rate=8_000)
    by_part = processor.apply_chat_template(
        chat({"type": "audio", "audio": clip, "sampling_rate": 8_000}), tokenize=True, return_dict=True
    )
    by_kwarg = processor.apply_chat_template(
        chat({"type": "audio", "audio": clip}),
        tokenize=True,
        return_dict=True,
        processor_kwargs={"sampling_rate": 8_000},
    )
    separate = processor.apply_chat_template(
        chat({"type": "audio"}), tokenize=True, return_dict=True, audio=[clip], sampling_rate=8_000
    )
    nested = processor.apply_chat_template(
        chat({"type": "audio", "audio": clip}),
        tokenize=True,
        return_dict=True,
        processor_kwargs={"audio_kwargs": {"sampling_rate": 8_000}},
    )
    for out in (by_kwarg, separate, nested):
        assert out["input_ids"] == by_part["input_ids"]
        np.testing.assert_array_equal(out["input_features"], by_part["input_features"])
    with pytest.raises(ValueError, match="without its sampling rate"):
        processor.apply_chat_template(chat({"type": "audio", "audio": clip}), tokenize=True)
    with pytest.raises(ValueError, match="no clip is left in `audio=`"):
        processor.apply_chat_template(chat({"type": "audio"}), tokenize=True)
    with pytest.raises(ValueError, match="1 audio clip given as `audio=` has no"):
        processor.apply_chat_template(
            chat({"type": "text", "text": "hi"}), tokenize=True, audio=[clip], sampling_rate=8_000
        )
    with pytest.raises(ValueError, match="Unsupported content part of type 'image'"):
        processor.apply_chat_template(chat({"type": "image", "url": "cat.png"}))


# ---- transformers' pipeline and persistence ---------------------------------------------------------------------


def test_any_to_any_pipeline_answers_a_chat_with_audio(saved):
    pipe = pipeline("any-to-any", model=str(saved), trust_remote_code=True)
    messages = chat(
        {"type": "audio", "audio": noise(1.0, seed=11), "sampling_rate": SR}, {"type": "text", "text": PROMPT}
    )
    result = pipe(text=messages, max_new_tokens=4, do_sample=False)
    answer = result[0]["generated_text"][-1]
    assert answer["role"] == "assistant" and isinstance(answer["content"], str) and answer["content"]
    plain = pipe(
        text="<|audio|> " + PROMPT, audio=noise(1.0), max_new_tokens=2, processor_kwargs={"sampling_rate": SR}
    )
    assert isinstance(plain[0]["generated_text"], str)


def test_save_pretrained_writes_code_and_auto_maps_and_reloads(saved, processor):
    for name in ("processing_mowe.py", "feature_extraction_mowe.py", "encoders.py", "configuration_mowe.py"):
        assert (saved / name).exists(), name
    config = json.loads((saved / "processor_config.json").read_text())
    assert config["auto_map"] == {"AutoProcessor": "processing_mowe.MoWEProcessor"}
    assert (
        config["feature_extractor"]["auto_map"]["AutoFeatureExtractor"]
        == "feature_extraction_mowe.MoWEFeatureExtractor"
    )
    assert config["processor_class"] == "MoWEProcessor" and config["stack_factor"] == 4
    assert (saved / "chat_template.jinja").read_text() == processor.chat_template
    loaded = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    assert loaded.tokenizer.padding_side == "left" and loaded.audio_token_id == processor.audio_token_id
    clips = [noise(0.7, seed=12), noise(1.3, seed=13)]
    texts = ["<|audio|> hi", "and <|audio|>"]
    expected, got = (p(text=texts, audio=clips, sampling_rate=SR, return_tensors="np") for p in (processor, loaded))
    assert set(expected) == set(got)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


REMOTE_SCRIPT = """
import json
import numpy as np
from transformers import AutoProcessor, pipeline

folder = sys.argv[1]
data = np.load("clips.npz")
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
out = processor(text=["<|audio|> hi", "and <|audio|>"], audio=[data["a"], data["b"]], sampling_rate=16000)
np.savez("remote.npz", **{k: np.asarray(v) for k, v in out.items()})
pipe = pipeline("any-to-any", model=folder, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "audio", "audio": data["a"], "sampling_rate": 16000},
                                         {"type": "text", "text": "Transcribe the audio."}]}]
answer = pipe(text=messages, max_new_tokens=3, do_sample=False)[0]["generated_text"][-1]["content"]
print(json.dumps({"processor": type(processor).__module__, "extractor": type(processor.feature_extractor).__module__,
                  "answer": answer, "chat_template": processor.chat_template}))
"""


def test_loads_from_its_own_code_where_the_package_cannot_be_imported(saved, processor, tmp_path):
    clips = {"a": noise(0.7, seed=12), "b": noise(1.3, seed=13)}
    np.savez(tmp_path / "clips.npz", **clips)
    result = run_without_package(REMOTE_SCRIPT, str(saved), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["processor"].startswith("transformers_modules.") and report["processor"].endswith(".processing_mowe")
    assert report["extractor"].endswith(".feature_extraction_mowe") and isinstance(report["answer"], str)
    assert report["chat_template"] == processor.chat_template == (saved / "chat_template.jinja").read_text()
    remote = np.load(tmp_path / "remote.npz")
    expected = processor(text=["<|audio|> hi", "and <|audio|>"], audio=[clips["a"], clips["b"]], sampling_rate=SR)
    assert sorted(remote.files) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(remote[key], np.asarray(expected[key]))


# ---- from_components ------------------------------------------------------------------------------------------------


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A small word-level tokenizer with an EOS, no pad token and no <|audio|>, like many LLM tokenizers."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(["<unk>", "<eos>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def components(tmp_path_factory) -> dict[str, Path]:
    """Tiny pretrained parts saved to folders: Whisper 128-mel, Whisper 80-mel, HuBERT, and a Llama + tokenizer."""
    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    parts = {
        "base": tiny_whisper(128, 32),
        "whisper80": tiny_whisper(80, 16),
        "hubert": HubertModel(
            HubertConfig(
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                conv_dim=(16,) * 7,
                num_conv_pos_embeddings=8,
                num_conv_pos_embedding_groups=2,
            )
        ),
    }
    tokenizer = word_tokenizer(["transcribe", "the", "audio.", "hello"])
    llm = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=1,
        bos_token_id=None,
        pad_token_id=None,
    )
    # "llm": vocabulary == tokenizer (as Llama 3); "llm_padded": a few spare rows (as Qwen2).
    parts["llm"] = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **llm))
    parts["llm_padded"] = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) + 2, **llm))
    folders = {}
    for name, part in parts.items():
        folders[name] = root / name
        part.save_pretrained(folders[name])
    for name in ("llm", "llm_padded"):
        tokenizer.save_pretrained(folders[name])
    return folders


def test_from_components_builds_front_ends_and_adds_the_audio_token(components):
    processor = MoWEProcessor.from_components(
        components["base"], [components["whisper80"], components["whisper80"], components["hubert"]], components["llm"]
    )
    assert processor.feature_extractor.front_ends == [
        {"kind": "log_mel", "n_mels": 128},
        {"kind": "log_mel", "n_mels": 80},
        {"kind": "waveform"},
    ]
    assert processor.feature_extractor.min_samples == 400  # HuBERT's receptive field
    tokenizer = processor.tokenizer
    assert processor.audio_token_id == len(tokenizer) - 1 == 8  # after <|im_start|>, <|im_end|>: no own template
    assert tokenizer.tokenize("<|im_start|>hello <|audio|><|im_end|>") == [
        "<|im_start|>", "hello", "<|audio|>", "<|im_end|>"
    ]
    assert tokenizer.pad_token == "<eos>" and tokenizer.padding_side == "left"
    assert processor.frame_spec.type == "whisper" and processor.stack_factor == 4
    base_only = MoWEProcessor.from_components(
        components["base"], [components["hubert"]], components["llm"], router_type="none", stack_factor=2
    )
    assert base_only.feature_extractor.front_ends == [{"kind": "log_mel", "n_mels": 128}]
    assert base_only.stack_factor == 2 and base_only.num_audio_tokens(SR) == 25


@pytest.mark.parametrize("llm", ["llm_padded", "llm"])
def test_from_components_processor_and_model_agree(components, tmp_path, llm):
    weak = [components["whisper80"], components["hubert"]]
    processor = MoWEProcessor.from_components(components["base"], weak, components[llm], dynamic_audio_length=True)
    model = MoWEForConditionalGeneration.from_components(
        components["base"], weak, components[llm], processor=processor, dynamic_audio_length=True
    ).eval()
    assert model.get_input_embeddings().weight.shape[0] >= len(processor.tokenizer)
    inputs = processor.apply_chat_template(
        [
            chat(
                {"type": "audio", "audio": noise(0.6), "sampling_rate": SR},
                {"type": "text", "text": "transcribe the audio."},
            ),
            chat(
                {"type": "text", "text": "hello"}, {"type": "audio", "audio": noise(1.1, seed=1), "sampling_rate": SR}
            ),
        ],
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model(**inputs)
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2
    processor.save_pretrained(tmp_path)
    reloaded = MoWEProcessor.from_pretrained(tmp_path)
    assert reloaded.audio_token_id == processor.audio_token_id and reloaded.tokenizer.pad_token == "<eos>"


def test_a_tokenizer_without_the_audio_token_is_refused(components, processor):
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match=r"The tokenizer has no <\|audio\|> token.*from_components"):
        MoWEProcessor(processor.feature_extractor, AutoTokenizer.from_pretrained(components["llm"]))

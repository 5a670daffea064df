"""Scale-out on CPU: FSDP2 on 2 gloo ranks equals one process; `device_map="auto"` splits at layers and offloads.

Run by pytest; under `torchrun` this file is also the FSDP2 worker (`python -m torch.distributed.run ... <this file>`).
`accelerate launch` cannot run its FSDP plugin on CPU (its state turns an FSDP config on CPU into `MULTI_CPU`, plain
DDP), so the worker calls accelerate's own `fsdp2_prepare_model` with the plugin's defaults, which is what
`accelerate launch --config_file examples/accelerate/fsdp.yaml` applies on GPUs.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY, make_clip, make_inputs, tiny_processor  # noqa: E402

from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration  # noqa: E402
from modeling_mowe.training import exit_distributed_process  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Transcribe the audio. <|audio|>", "<|audio|> Is the speaker male or female?"]
# The global batch: rank r of 2 trains on rows 2r and 2r + 1 (one process: both halves).
CLIPS = [(1.1, 0), (1.9, 1), (0.8, 2), (1.5, 3)]
# fp32 on both sides; only the order of the cross-rank sums differs.
ATOL, RTOL = 1e-5, 1e-4


def build_model(seed: int = 0) -> MoWEForConditionalGeneration:
    torch.manual_seed(seed)
    return MoWEForConditionalGeneration(MoWEConfig.from_pretrained(TINY, dynamic_audio_length=True))


def route_by_rank(model: MoWEForConditionalGeneration, halves: list) -> None:
    """Sparse routing that differs between the ranks: the data-independent router picks encoder 3 for every clip; the
    data-dependent one sends rank 0's clips to encoder 0 and rank 1's to encoder 2 (its classifier solved on their
    pooled base features). Encoder 1 gets no clip at all. In training too: no sampled exploration."""
    model.config.router_sampling = False
    tower = model.model.audio_tower
    pooled = []
    hook = tower.router_dependent.classifier.register_forward_hook(lambda m, args, out: pooled.append(args[0]))
    with torch.no_grad():
        for inputs, _ in halves:
            model(**inputs)
        hook.remove()
        targets = torch.tensor([0, 0, 2, 2])
        logits = 8.0 * (torch.nn.functional.one_hot(targets, 4).float() - 0.5)
        tower.router_dependent.classifier.weight.copy_((torch.linalg.pinv(torch.cat(pooled)) @ logits).T)
        tower.router_dependent.classifier.bias.zero_()
        tower.router_independent.logits.copy_(torch.tensor([0.0, 0.0, 0.0, 4.0]))


def half_batches(processor) -> list[tuple[dict, torch.Tensor]]:
    """The two ranks' batches (each collated on its own, as a data-parallel loader does) with their LM labels."""
    halves = []
    for rank in range(2):
        clips = [make_clip(seconds, seed=seed, kind="sine") for seconds, seed in CLIPS[2 * rank : 2 * rank + 2]]
        inputs = make_inputs(processor, TEXTS, clips)
        labels = inputs["input_ids"].clone()
        labels[(inputs["attention_mask"] == 0) | (labels == processor.audio_token_id)] = -100
        halves.append((inputs, labels))
    return halves


def shard_with_fsdp2(model: MoWEForConditionalGeneration, mesh) -> None:
    """FSDP2 units as accelerate's default `TRANSFORMER_BASED_WRAP` (no class list) picks them: every module whose
    class is in the model's `_no_split_modules` (the base and weak encoders' layers, the LLM's decoder layers, the
    projector), bottom-up, then the root (routers, weak projections, convs, embeddings, head)."""
    from torch.distributed.fsdp import fully_shard

    no_split = set(model._no_split_modules)
    units = [m for m in model.modules() if m is not model and type(m).__name__ in no_split]
    for module in reversed(units):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def shard_with_accelerate(model: MoWEForConditionalGeneration) -> None:
    """accelerate's FSDP2 preparation with its plugin's defaults (`TRANSFORMER_BASED_WRAP`, no class list: the
    model's `_no_split_modules`; embeddings and head carved into their own unit), driven without `accelerate launch`,
    which turns FSDP on CPU into DDP."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=False
    )
    stand_in = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision="no",
        is_main_process=True,
        device=torch.device("cpu"),
    )
    fsdp2_prepare_model(stand_in, model)


def weak_encoders_used(router_indices: torch.Tensor) -> list[int]:
    return sorted(set(router_indices.reshape(-1).tolist()))


def single_process_step(model: MoWEForConditionalGeneration, halves: list) -> tuple[float, dict]:
    """What data parallel computes for the global batch, in one process: the mean of the halves' losses and of their
    gradients: one backward per half, then / 2."""
    mean_loss = 0.0
    for inputs, labels in halves:
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        mean_loss += loss.item() / len(halves)
    return mean_loss, {n: p.grad / len(halves) for n, p in model.named_parameters() if p.grad is not None}


def sharded_step(model, halves: list, rank: int, world: int, reference_grads: dict) -> dict:
    """One training step of the sharded `model` on this rank's half, compared with the single-process gradients."""
    import torch.distributed as dist

    inputs, labels = halves[rank]
    outputs = model(**inputs, labels=labels)
    outputs.loss.backward()
    loss = outputs.loss.detach().clone()
    dist.all_reduce(loss)
    used = [None] * world
    dist.all_gather_object(used, weak_encoders_used(outputs.router_indices))
    missing, mismatched, compared, sharded = [], {}, 0, 0
    for name, param in model.named_parameters():  # every rank, same order: full_tensor() is a collective
        if param.grad is None:
            if param.requires_grad:
                missing.append(name)
            continue
        grad, expected = param.grad.full_tensor(), reference_grads[name]
        sharded += param.to_local().numel() < param.numel()
        compared += 1
        if not torch.allclose(grad, expected, atol=ATOL, rtol=RTOL):
            mismatched[name] = (grad - expected).abs().max().item()
    from torch.distributed.fsdp import FSDPModule

    units = sorted({type(m).__name__.removeprefix("FSDP") for m in model.modules() if isinstance(m, FSDPModule)})
    weak_units = sum(isinstance(m, FSDPModule) for m in model.model.audio_tower.weak_encoders.modules())
    return {
        "loss": loss.item() / world, "missing_grads": missing, "mismatched": mismatched, "compared": compared,
        "sharded_params": sharded, "weak_encoders_used": used, "unit_classes": units, "weak_units": weak_units,
    }


def ddp_steps(model, halves: list, rank: int, world: int, reference_grads: dict) -> dict:
    """Two DDP steps (`find_unused_parameters=False`, which raises on the second step if a parameter got no gradient
    in the first) on this rank's half: the first step's gradients against the single-process ones, and how far the
    ranks' weights differ after both."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
    inputs, labels = halves[rank]
    mismatched = {}
    for step in range(2):
        optimizer.zero_grad()
        ddp(**inputs, labels=labels).loss.backward()
        if step == 0:
            for name, param in model.named_parameters():
                if param.grad is not None and not torch.allclose(
                    param.grad, reference_grads[name], atol=ATOL, rtol=RTOL
                ):
                    mismatched[name] = (param.grad - reference_grads[name]).abs().max().item()
        optimizer.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return {"mismatched": mismatched, "rank_difference": max((g - flat).abs().max().item() for g in gathered)}


def fsdp_worker(out_dir: Path) -> None:
    """One rank: the single-process reference on the global batch, then the same step under FSDP2 (wrapped by hand as
    accelerate's default does, and by accelerate's own preparation), compared; then, for the hand-wrapped model, an SGD
    step, eval logits (ranks still route differently) and a sharded (torch distributed checkpoint) save."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    halves = half_batches(tiny_processor(dynamic_audio_length=True))

    model = build_model()
    route_by_rank(model, halves)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference_loss, reference_grads = single_process_step(copy.deepcopy(model), halves)
    with torch.no_grad():
        reference_eval_logits = model.eval()(**halves[rank][0]).logits
    model.train()

    result = {"ddp": ddp_steps(copy.deepcopy(model), halves, rank, world, reference_grads)}
    by_accelerate = copy.deepcopy(model)
    shard_with_accelerate(by_accelerate)
    result["accelerate"] = sharded_step(by_accelerate, halves, rank, world, reference_grads)
    del by_accelerate

    shard_with_fsdp2(model, mesh)
    result["torch"] = sharded_step(model, halves, rank, world, reference_grads)
    model.eval()
    with torch.no_grad():  # sparse routing that differs between the ranks, in eval, with the pool sharded per layer
        outputs = model(**halves[rank][0])
    used = [None] * world
    dist.all_gather_object(used, weak_encoders_used(outputs.router_indices))
    eval_difference = (outputs.logits - reference_eval_logits).abs().max().item()
    result["eval"] = {"weak_encoders_used": used, "logits_difference": eval_difference}
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    with torch.no_grad():
        logits = model(**halves[rank][0]).logits
    dcp.save(get_model_state_dict(model), checkpoint_id=str(out_dir / "dcp"))
    save_file({"logits": logits.contiguous()}, str(out_dir / f"logits_{rank}.safetensors"))
    result.update(reference_loss=reference_loss, reference_params=len(reference_grads))
    (out_dir / f"result_{rank}.json").write_text(json.dumps(result))
    exit_distributed_process()


def sharded_checkpoint_to_folder(dcp_dir: Path, folder: Path) -> None:
    """A torch distributed checkpoint of the model -> a `from_pretrained` folder (safetensors + config + code)."""
    import torch.distributed.checkpoint as dcp

    model = build_model(seed=1)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(dcp_dir), no_dist=True)
    model.load_state_dict(state)
    model.save_pretrained(folder)


@pytest.mark.slow
def test_fsdp2_and_ddp_steps_equal_one_process_and_sharded_checkpoint_reloads(tmp_path):
    """2 gloo ranks, FSDP2 on every `_no_split_modules` class (weak encoders' layers included, as accelerate's default
    wrapping does; by hand and by accelerate's own preparation), ranks routing to different weak encoders, gradient
    checkpointing: loss and every gradient equal the single-process run on the same global batch (atol 1e-5,
    rtol 1e-4); eval after a step does not hang; the sharded checkpoint turns into a `from_pretrained` folder whose
    logits equal the sharded model's. DDP with `find_unused_parameters=False` takes two steps: the same gradients, and
    identical ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        for how in ("torch", "accelerate"):
            step = r[how]
            assert abs(step["loss"] - r["reference_loss"]) <= ATOL + RTOL * abs(r["reference_loss"]), how
            assert step["mismatched"] == {} and step["missing_grads"] == [], how
            assert step["compared"] == r["reference_params"], how
            assert step["sharded_params"] > 0, how
            assert {"WhisperEncoderLayer", "HubertEncoderLayer", "LlamaDecoderLayer"} <= set(step["unit_classes"])
            assert step["weak_units"] >= 4, "the weak encoders' layers are not FSDP units: the test proves nothing"
    used = ranks[0]["torch"]["weak_encoders_used"]
    assert used[0] != used[1], "both ranks routed alike: the test would not cover sparse routing across ranks"
    assert set(used[0]) - set(used[1]) and set(used[1]) - set(used[0]), "no weak encoder used on one rank only"
    assert ranks[0]["accelerate"]["weak_encoders_used"] == used
    for r in ranks:  # eval of the sharded model before the step: the unsharded model's logits, routing still differs
        assert r["eval"]["weak_encoders_used"] == used and r["eval"]["logits_difference"] <= ATOL
    for r in ranks:  # DDP with find_unused_parameters=False: the same gradients, and identical ranks after 2 steps
        assert r["ddp"]["mismatched"] == {} and r["ddp"]["rank_difference"] == 0.0

    sharded_checkpoint_to_folder(tmp_path / "dcp", tmp_path / "folder")
    loaded = MoWEForConditionalGeneration.from_pretrained(tmp_path / "folder").eval()
    untrained = build_model().eval()
    from safetensors.torch import load_file

    for rank, (inputs, _) in enumerate(half_batches(tiny_processor(dynamic_audio_length=True))):
        with torch.no_grad():
            logits = loaded(**inputs).logits
            before = untrained(**inputs).logits
        sharded_logits = load_file(str(tmp_path / f"logits_{rank}.safetensors"))["logits"]
        torch.testing.assert_close(logits, sharded_logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(before, sharded_logits, atol=1e-3), (
            "the step changed nothing: the reload proves nothing"
        )


def test_no_split_modules_are_the_encoders_and_llm_layers():
    model = MoWEForConditionalGeneration(MoWEConfig.from_pretrained(TINY))
    assert {"WhisperEncoderLayer", "HubertEncoderLayer", "LlamaDecoderLayer"} <= set(model._no_split_modules)
    assert "MoWEAudioTower" not in model._no_split_modules
    present = {type(m).__name__ for m in model.modules()}
    assert set(model._no_split_modules) <= present  # accelerate's class-based wrapping refuses absent classes
    base_only = MoWEForConditionalGeneration(MoWEConfig.from_pretrained(TINY, router_type="none"))
    assert "HubertEncoderLayer" not in base_only._no_split_modules  # no weak pool, no HuBERT layers


def test_device_map_auto_with_disk_offload_generates_like_the_unsplit_model(processor, tmp_path):
    model = build_model().eval()
    model.save_pretrained(tmp_path / "model")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    split = MoWEForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": size // 4}, offload_folder=tmp_path / "offload"
    ).eval()
    placement = split.hf_device_map
    assert "disk" in placement.values() and "cpu" in placement.values()
    tower_parts = {device for name, device in placement.items() if name.startswith("model.audio_tower.")}
    assert tower_parts == {"cpu", "disk"}, placement  # the tower itself is split, at encoder layers or finer

    clips = [make_clip(seconds, seed=seed, kind="sine") for seconds, seed in CLIPS[:2]]
    inputs = make_inputs(processor, TEXTS, clips, padding_side="left")
    generate = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(split.generate(**inputs, **generate), model.generate(**inputs, **generate))


if __name__ == "__main__":
    fsdp_worker(Path(sys.argv[1]))

"""The MoWE arm's start: the projector's weak columns at zero (function-preserving) against a small random start.

    python benchmarks/weak_column_start.py --scales 0 0.1 0.3 1

The demo's real parts (frozen Whisper-base, 4 x Whisper-tiny.en, a from-scratch Llama), a base-only model as the
"aligned" one (untrained: what matters here is the start's arithmetic), a MoWE model started from it with the weak
columns at `scale` x the std of the base columns. On one batch of benchmark clips (both routers sampling, as in
training), prints the relative change of the logits against the base-only model and the LM-loss gradient norms that
reach the weak encoders, their projections and the routers at step 0.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from modeling_mowe.data import BenchmarkConfig, build_benchmark
from modeling_mowe.experiments.demo import ALIGNED_PARTS, DemoSettings, build_model, prepare_parts, start_from_aligned
from modeling_mowe.training import MoWEDataCollator


def grad_norm(module: torch.nn.Module) -> float:
    return float(sum(p.grad.pow(2).sum() for p in module.parameters() if p.grad is not None) ** 0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0])
    parser.add_argument("--clips", type=int, default=8)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        settings = DemoSettings(output_dir=Path(tmp))
        parts = prepare_parts(settings)
        splits = build_benchmark(Path(tmp) / "bench", BenchmarkConfig(train_per_task=2, validation_per_task=0,
                                                                       test_per_task=0), progress=False)
        base_only, processor = build_model(settings, parts, "none")
        aligned = {k: v for k, v in base_only.state_dict().items() if k.startswith(ALIGNED_PARTS)}
        rows = [splits["train"][i] for i in range(min(args.clips, len(splits["train"])))]
        with torch.no_grad():
            reference = base_only(**MoWEDataCollator(processor)(rows)).logits
        for scale in args.scales:
            model, mowe_processor = build_model(settings, parts, "both")
            start_from_aligned(model, aligned, weak_init_scale=scale)
            model.config.router_aux_loss_coef = 0.0  # the LM loss's own gradients
            batch = MoWEDataCollator(mowe_processor)(rows)
            model.train()
            torch.manual_seed(0)
            out = model(**batch)
            change = float((out.logits.detach() - reference).norm() / reference.norm())
            out.loss.backward()
            tower = model.get_encoder(modality="audio")
            print(f"scale {scale:4.2f}: logits change {change:.4f} (relative); LM-loss gradient norms: "
                  f"weak encoders {grad_norm(tower.weak_encoders):.2e}, weak projections "
                  f"{grad_norm(tower.weak_projections):.2e}, data-independent router "
                  f"{grad_norm(tower.router_independent):.2e}, data-dependent router "
                  f"{grad_norm(tower.router_dependent):.2e}", flush=True)


if __name__ == "__main__":
    main()

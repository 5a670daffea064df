#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (80 GB class; the 8-billion presets take ~17 GB of bf16 weights, and the LoRA
# step with gradient checkpointing fits on one H100): the full-size paper presets with random weights in bf16, one
# SFT step each for MoWE and base-only (step time and peak memory as ratios) and `generate` tokens/s.
# Figures go to outputs/gpu_check/<preset>.json and are printed. Needs the .venv (scripts/setup.sh) with a CUDA
# torch wheel. Not run yet: no GPU was available where this project was built.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU found (nvidia-smi)." >&2
  exit 1
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: this torch has no CUDA')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
for preset in mowe-llama3-8b-4x-whisper-tiny mowe-llama3-8b-2x-whisper-tiny-2x-hubert; do
  .venv/bin/python benchmarks/bench_gpu.py --preset "hub_configs/$preset" --device cuda --steps 3 --batch-size 4 \
    --output "outputs/gpu_check/$preset.json" "$@"
done

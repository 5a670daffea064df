#!/usr/bin/env bash
# README command 1: set up (idempotent) and run the demo: MoWE vs base-only on the self-made speech benchmark.
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --steps 300` (`--help` lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m modeling_mowe.experiments "$@"

#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: system packages, the .venv at the repo root, CPU torch first
# (a bare `torch` requirement would pull a multi-GB CUDA build), then this package in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v espeak-ng >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq espeak-ng >/dev/null
fi

# Headless browser for the Space test; Playwright drives this one (`playwright install` needs a CDN).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq chromium >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv

stamp=.venv/.mowe-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip show torch >/dev/null 2>&1 || \
        .venv/bin/python -m pip install -q "torch==${MOWE_TORCH_VERSION:-2.13.0}"
    .venv/bin/python -m pip install -q -e ".[train,dev]"
    rm -f .venv/.mowe-setup-*
    touch "$stamp"
fi

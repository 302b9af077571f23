#!/usr/bin/env bash
# Create .venv in the repo root (if missing) and install kimiray with the given extras.
#
# torch (only when .venv has none): the build that fits the machine, installed before the project so the range
# in pyproject.toml pulls nothing more.
#   no NVIDIA GPU (no working nvidia-smi): the CPU build from PyTorch's CPU wheel index (~200 MB, no CUDA wheels);
#                                          if that index can't be reached, torch from PyPI instead
#   an NVIDIA GPU:                         PyPI's torch, which is the CUDA build on Linux
#   KIMIRAY_TORCH_INDEX=URL                that index instead (e.g. https://download.pytorch.org/whl/cu128);
#                                          KIMIRAY_TORCH_INDEX=pypi forces PyPI
#   KIMIRAY_TORCH_SPEC=SPEC                the requirement (default torch==2.13.0; any torch>=2.5,<2.15 works)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip

install_torch() {
    local spec="${KIMIRAY_TORCH_SPEC:-torch==2.13.0}" index="${KIMIRAY_TORCH_INDEX:-}"
    if [ -z "$index" ]; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            index=pypi
        else
            index="$TORCH_CPU_INDEX"
        fi
    fi
    if [ "$index" = pypi ]; then
        echo "[bootstrap] installing $spec from PyPI" >&2
        pip install -q "$spec"
        return
    fi
    echo "[bootstrap] installing $spec from $index" >&2
    # a short timeout and no retries: an unreachable index costs seconds, then PyPI takes over
    if ! pip install -q --timeout 10 --retries 0 --index-url "$index" "$spec"; then
        echo "[bootstrap] $index could not be used; installing $spec from PyPI instead" >&2
        pip install -q "$spec"
    fi
}

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    install_torch
fi
if [ -n "$extras" ]; then
    pip install -q -e ".[$extras]"
else
    pip install -q -e .
fi

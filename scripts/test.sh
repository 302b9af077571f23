#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv with the test extras, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test
# Triton for the kernels' checks under its interpreter on CPU (tests/test_triton_interpreter_engine.py, test_fp8.py,
# test_triton_pdl.py; ~1 min): a CPU torch brings none (3.9 is what they pass with); a CUDA torch brings its own.
.venv/bin/python -c "import triton" 2>/dev/null || .venv/bin/python -m pip install -q "triton>=3.9,<3.10"
# System packages the tests start themselves: redis-server (free loopback ports), Xvfb + xdotool + Tk (desktops),
# Tesseract's English data for OCR of scanned pages (PyMuPDF's built-in Tesseract reads it), chromium (the web
# console's browser tests).
APT_PKGS=()
command -v redis-server >/dev/null 2>&1 || APT_PKGS+=(redis-server)
command -v Xvfb >/dev/null 2>&1 || APT_PKGS+=(xvfb)
command -v xdotool >/dev/null 2>&1 || APT_PKGS+=(xdotool)
.venv/bin/python -c "import tkinter" 2>/dev/null || APT_PKGS+=(python3-tk)  # the desktop tests' Tk app
command -v tesseract >/dev/null 2>&1 || APT_PKGS+=(tesseract-ocr)
ls /usr/share/tesseract-ocr/*/tessdata/eng.traineddata >/dev/null 2>&1 || APT_PKGS+=(tesseract-ocr-eng)
[ -x /usr/bin/chromium ] || APT_PKGS+=(chromium)  # the console's browser tests (Playwright drives it)
command -v mousepad >/dev/null 2>&1 || APT_PKGS+=(mousepad)  # the OS agent's real-app tasks: a text editor ...
command -v xterm >/dev/null 2>&1 || APT_PKGS+=(xterm)  # ... and a terminal the default policy refuses typing into
if [ "${#APT_PKGS[@]}" -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${APT_PKGS[@]}" >/dev/null
fi
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Static checks first (seconds): the layer order and no import cycles (pyproject [tool.importlinter]), then ruff.
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" .venv/bin/lint-imports
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"

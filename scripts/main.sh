#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up .venv, start a local Ray with the Serve application (tiny
# checkpoint, embedded store), submit a generated sample contract through the SDK with a progress bar, print the
# JSON result and the annotated PDF's path. Pass --model PATH_OR_HF_ID / --pdf FILE for real ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# OCR of scanned pages (the sample contract has one) needs Tesseract's English data.
if ! ls /usr/share/tesseract-ocr/*/tessdata/eng.traineddata >/dev/null 2>&1 && [ -z "${TESSDATA_PREFIX:-}" ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    { $SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        --no-install-recommends tesseract-ocr tesseract-ocr-eng >/dev/null; } \
        || echo "warning: could not install tesseract-ocr-eng; scanned pages will fail with ocr_unavailable" >&2
fi
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/kimiray contract-demo "$@"

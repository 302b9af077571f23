#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up .venv, start a local Ray with the Serve application (tiny
# checkpoint, embedded store), submit a generated sample contract through the SDK with a progress bar, print the
# JSON result and the annotated PDF's path. Pass --model PATH_OR_HF_ID / --pdf FILE for real ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/kimiray contract-demo "$@"

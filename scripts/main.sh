#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up .venv, write the tiny checkpoint, answer an image question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/kimiray demo "$@"

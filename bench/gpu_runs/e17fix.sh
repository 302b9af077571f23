#!/usr/bin/env bash
# Issue 17, Sixth H100 run, call 3 (`timeout 250 bash bench/gpu_runs/e17fix.sh`, base tree 6223bd8 in .gpu_base): the
# router GPU tests with the corrected bound, then fp8 decode b1/b64 on this tree and the base tree. This tree's run
# compiles the kernels first and needs more than 70 s (call 3 timed out there; call 4 reran it alone with 125 s).
set -uo pipefail
source "$(dirname "$0")/common.sh"
timeout 100 python3 -m pytest -q -m gpu tests/test_gpu_kernels.py -p no:cacheprovider -k "router_logits" 2>&1 \
  | grep -E "Error|assert|passed|failed" | head
for tree in head base; do
  dir=$PWD; [ $tree = base ] && dir=$PWD/.gpu_base
  (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout 125 python3 bench/engine_bench.py --skip-hf --decode-only \
    --quantization fp8 --batches 1 64 64 --json "$OUT/fp8_$tree.json" > "$OUT/fp8_$tree.log" 2>&1)
  echo "$tree rc $?"; summary "$OUT/fp8_$tree.json" "$OUT/fp8_$tree.log"
done

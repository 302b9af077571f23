#!/usr/bin/env bash
# Issue 17, batch-1 kernels (run as `timeout 570 bash bench/gpu_runs/e17b1.sh`, base tree in .gpu_base): GPU tests
# of the new kernels (few-row projections, prologue with W_UK, attention with W_UV in its epilogue), then decode
# bf16 and fp8 on this tree and on the base tree in the same call, and this tree's batch-1 kernel table.
set -uo pipefail
source "$(dirname "$0")/common.sh"
echo "### gpu tests $(date +%T)"
timeout 120 python3 -m pytest -q -x -m gpu tests/test_gpu_kernels.py -k "fused_decode_kernels or fast_decode_step or cuda_graph" \
  -p no:cacheprovider 2>&1 | grep -E "Error|assert|passed|failed" | head -20
for tree in head base; do
  dir=$PWD; [ $tree = base ] && dir=$PWD/.gpu_base
  prof=(); [ $tree = head ] && prof=(--profile "$OUT/profile_$tree.txt")
  echo "### bf16 $tree $(date +%T)"
  (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout 150 python3 bench/engine_bench.py --skip-hf --decode-only \
    --batches 1 2 8 32 64 64 "${prof[@]}" --json "$OUT/bf16_$tree.json" > "$OUT/bf16_$tree.log" 2>&1); echo "rc $?"
  summary "$OUT/bf16_$tree.json" "$OUT/bf16_$tree.log"
done
for tree in head base; do
  dir=$PWD; [ $tree = base ] && dir=$PWD/.gpu_base
  echo "### fp8 $tree $(date +%T)"
  (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout 110 python3 bench/engine_bench.py --skip-hf --decode-only \
    --quantization fp8 --batches 1 32 64 64 --json "$OUT/fp8_$tree.json" > "$OUT/fp8_$tree.log" 2>&1); echo "rc $?"
  summary "$OUT/fp8_$tree.json" "$OUT/fp8_$tree.log"
done
grep -A30 "graph replays" "$OUT/profile_head.txt" | cut -c1-60,150-250
echo "### end $(date +%T)"

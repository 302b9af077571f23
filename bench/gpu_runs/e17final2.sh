#!/usr/bin/env bash
# Issue 17, PDL-chained decode (run as `timeout 490 bash bench/gpu_runs/e17final2.sh`, base tree in .gpu_base):
# decode bf16 and fp8 on this tree and on the base tree in the same call, then the GPU tests of the decode kernels.
set -uo pipefail
source "$(dirname "$0")/common.sh"
for q in bf16 fp8; do
  for tree in head base; do
    dir=$PWD; [ $tree = base ] && dir=$PWD/.gpu_base
    args=(--batches 1 2 8 32 64 64); [ $q = fp8 ] && args=(--quantization fp8 --batches 1 64 64)
    echo "### $q $tree $(date +%T)"
    (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout 100 python3 bench/engine_bench.py --skip-hf --decode-only \
      "${args[@]}" --json "$OUT/${q}_$tree.json" > "$OUT/${q}_$tree.log" 2>&1); echo "rc $?"
    summary "$OUT/${q}_$tree.json" "$OUT/${q}_$tree.log"
  done
done
echo "### gpu tests $(date +%T)"
timeout 135 python3 -m pytest -q -x -m gpu tests/test_gpu_kernels.py -k "fused_decode_kernels or fast_decode_step or cuda_graph" \
  -p no:cacheprovider 2>&1 | grep -E "Error|assert|passed|failed" | head -20
echo "### end $(date +%T)"

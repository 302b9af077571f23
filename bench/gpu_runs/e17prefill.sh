#!/usr/bin/env bash
# Issue 17, prefill glue (run as `timeout 560 bash bench/gpu_runs/e17prefill.sh`, base tree in .gpu_base): the GPU
# tests of the prefill MoE combine and the decode kernels, then 8K / 32K prefill on this tree and the base tree in
# the same call, this tree's fp8 prefill, and this tree's 8K prefill kernel table (engine_bench --profile).
set -uo pipefail
source "$(dirname "$0")/common.sh"
echo "### gpu tests $(date +%T)"
timeout 150 python3 -m pytest -q -x -m gpu tests/test_gpu_kernels.py -k "combine or silu or fused_decode_kernels" \
  -p no:cacheprovider 2>&1 | grep -E "Error|assert|passed|failed" | head -20
for tree in head base; do
  dir=$PWD; [ $tree = base ] && dir=$PWD/.gpu_base
  prof=(); [ $tree = head ] && prof=(--profile "$OUT/profile_$tree.txt")
  echo "### prefill $tree $(date +%T)"
  (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout 150 python3 bench/engine_bench.py --skip-hf --batches 1 \
    --prefill 8192 32768 --longest 32768 --prefill-chunks 32768 "${prof[@]}" --json "$OUT/prefill_$tree.json" \
    > "$OUT/prefill_$tree.log" 2>&1); echo "rc $?"
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); [print(p) for p in r.get("prefill", [])]' \
    "$OUT/prefill_$tree.json" 2>/dev/null || tail -5 "$OUT/prefill_$tree.log" | cut -c1-300
done
echo "### prefill fp8 head $(date +%T)"
timeout 120 python3 bench/engine_bench.py --skip-hf --batches 1 --quantization fp8 --prefill 8192 32768 \
  --longest 32768 --prefill-chunks 32768 --json "$OUT/prefill_fp8_head.json" > "$OUT/prefill_fp8_head.log" 2>&1
echo "rc $?"; python3 -c 'import json,sys; [print(p) for p in json.load(open(sys.argv[1])).get("prefill", [])]' \
  "$OUT/prefill_fp8_head.json" 2>/dev/null || tail -5 "$OUT/prefill_fp8_head.log" | cut -c1-300
grep -A30 "8K prefill step" "$OUT/profile_head.txt" | cut -c1-60,150-260
echo "### end $(date +%T)"

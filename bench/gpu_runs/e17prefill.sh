#!/usr/bin/env bash
# Issue 17, prefill glue, in two calls (`timeout 560 bash bench/gpu_runs/e17prefill.sh 1`, then `... 2`; no base
# tree needed). Part 1: the GPU tests
# of the prefill kernels (layout, MoE combine, SwiGLU), then 8K prefill with those kernels switched on one at a time
# in one process (bench/gpu_runs/e17prefill_variants.py: rounds interleaved, medians) plus 32K in one chunk, bf16 and
# fp8. Part 2: this tree's 8K prefill kernel table (engine_bench --profile) and decode first rounds after the
# warm-up.
set -uo pipefail
source "$(dirname "$0")/common.sh"
part=${1:-1}
if [ "$part" = 1 ]; then
echo "### gpu tests $(date +%T)"
timeout 150 python3 -m pytest -q -x -m gpu tests/test_gpu_kernels.py -k "prefill_layout or combine or silu" \
  -p no:cacheprovider 2>&1 | grep -E "Error|assert|passed|failed" | head -20
echo "### variants bf16 $(date +%T)"
timeout 200 python3 bench/gpu_runs/e17prefill_variants.py --rounds 5 > "$OUT/variants_bf16.log" 2>&1; echo "rc $?"
grep -E "^(PREFILL|ROUND)" "$OUT/variants_bf16.log" | grep -v ROUND; tail -3 "$OUT/variants_bf16.log" | cut -c1-300
echo "### variants fp8 $(date +%T)"
timeout 120 python3 bench/gpu_runs/e17prefill_variants.py --rounds 3 --fp8 --long 0 > "$OUT/variants_fp8.log" 2>&1
echo "rc $?"; grep -E "^PREFILL" "$OUT/variants_fp8.log"
fi
if [ "$part" = 2 ]; then
echo "### profile $(date +%T)"
timeout 150 python3 bench/engine_bench.py --skip-hf --batches 1 --prefill 8192 --longest 8192 --profile \
  "$OUT/profile.txt" --json "$OUT/profile_run.json" > "$OUT/profile.log" 2>&1; echo "rc $?"
grep -A30 "8K prefill step" "$OUT/profile.txt" | cut -c1-60,150-260
echo "### decode warm-up $(date +%T)"  # first rounds with every bucket's kernels compiled at start (compare 30.3 ms b64)
timeout 150 python3 bench/engine_bench.py --skip-hf --decode-only --batches 1 64 --warm-up --json "$OUT/warm.json" \
  > "$OUT/warm.log" 2>&1; echo "rc $?"; python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("engine_start_s", r.get("engine_start_s"))' "$OUT/warm.json"
summary "$OUT/warm.json" "$OUT/warm.log"
fi
echo "### end $(date +%T)"

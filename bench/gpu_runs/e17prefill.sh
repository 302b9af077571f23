#!/usr/bin/env bash
# Issue 17, prefill glue (run as `timeout 560 bash bench/gpu_runs/e17prefill.sh`; no base tree needed): the GPU tests
# of the prefill kernels (layout, MoE combine, SwiGLU), then 8K prefill with those kernels switched on one at a time
# in one process (bench/gpu_runs/e17prefill_variants.py: rounds interleaved, medians) plus 32K in one chunk, bf16 and
# fp8, and this tree's 8K prefill kernel table (engine_bench --profile).
set -uo pipefail
source "$(dirname "$0")/common.sh"
echo "### gpu tests $(date +%T)"
timeout 150 python3 -m pytest -q -x -m gpu tests/test_gpu_kernels.py -k "prefill_layout or combine or silu" \
  -p no:cacheprovider 2>&1 | grep -E "Error|assert|passed|failed" | head -20
echo "### variants bf16 $(date +%T)"
timeout 200 python3 bench/gpu_runs/e17prefill_variants.py --rounds 5 > "$OUT/variants_bf16.log" 2>&1; echo "rc $?"
grep -E "^(PREFILL|ROUND)" "$OUT/variants_bf16.log" | grep -v ROUND; tail -3 "$OUT/variants_bf16.log" | cut -c1-300
echo "### variants fp8 $(date +%T)"
timeout 120 python3 bench/gpu_runs/e17prefill_variants.py --rounds 3 --fp8 --long 0 > "$OUT/variants_fp8.log" 2>&1
echo "rc $?"; grep -E "^PREFILL" "$OUT/variants_fp8.log"
echo "### profile $(date +%T)"
timeout 150 python3 bench/engine_bench.py --skip-hf --batches 1 --prefill 8192 --longest 8192 --profile \
  "$OUT/profile.txt" --json "$OUT/profile_run.json" > "$OUT/profile.log" 2>&1; echo "rc $?"
grep -A30 "8K prefill step" "$OUT/profile.txt" | cut -c1-60,150-260
echo "### end $(date +%T)"

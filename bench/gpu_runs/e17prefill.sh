#!/usr/bin/env bash
# Issue 17, prefill glue, in one call (`timeout 570 bash bench/gpu_runs/e17prefill.sh`; no base tree needed): the
# GPU tests of the prefill kernels (layout, MoE combine, SwiGLU), then 8K prefill with those kernels switched on one at
# a time in one process (bench/gpu_runs/e17prefill_variants.py: rounds interleaved, medians) plus 32K in one chunk and
# the current 8K step's kernel table, bf16 and fp8; then decode first rounds after the warm-up.
set -uo pipefail
source "$(dirname "$0")/common.sh"
echo "### gpu tests $(date +%T)"
timeout 150 python3 -m pytest -q -x -m gpu tests/test_gpu_kernels.py -k "prefill_layout or combine or silu" \
  -p no:cacheprovider 2>&1 | grep -E "Error|assert|passed|failed" | head -20
echo "### variants bf16 $(date +%T)"
timeout 200 python3 bench/gpu_runs/e17prefill_variants.py --rounds 5 --profile "$OUT/profile_8k_bf16.txt" \
  > "$OUT/variants_bf16.log" 2>&1; echo "rc $?"
grep -E "^(PREFILL|PROFILE)" "$OUT/variants_bf16.log"; tail -3 "$OUT/variants_bf16.log" | cut -c1-300
head -30 "$OUT/profile_8k_bf16.txt" | cut -c1-58,150-270
echo "### variants fp8 $(date +%T)"
timeout 120 python3 bench/gpu_runs/e17prefill_variants.py --rounds 3 --fp8 --long 0 > "$OUT/variants_fp8.log" 2>&1
echo "rc $?"; grep -E "^PREFILL" "$OUT/variants_fp8.log"
echo "### decode warm-up $(date +%T)"  # first rounds with every bucket's kernels compiled at start (compare 30.3 ms b64)
timeout 150 python3 bench/engine_bench.py --skip-hf --decode-only --batches 1 64 --warm-up --json "$OUT/warm.json" \
  > "$OUT/warm.log" 2>&1; echo "rc $?"; python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("engine_start_s", r.get("engine_start_s"))' "$OUT/warm.json"
summary "$OUT/warm.json" "$OUT/warm.log"
echo "### end $(date +%T)"

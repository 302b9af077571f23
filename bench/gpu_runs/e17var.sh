#!/usr/bin/env bash
# Issue 17: decode at batches 1, 2, 8 under the kernel variants of e17variants.py (bf16, then fp8), one engine
# each; then the fp8 batch-1 kernel table with PDL off (kernel durations without the PDL waits in them).
set -uo pipefail
source "$(dirname "$0")/common.sh"
echo "### bf16 $(date +%T)"
timeout 200 python3 bench/gpu_runs/e17variants.py > "$OUT/var_bf16.log" 2>&1; echo "rc $?"
grep -E "VARIANT|Error|error" "$OUT/var_bf16.log" | cut -c1-300
echo "### fp8 $(date +%T)"
timeout 200 python3 bench/gpu_runs/e17variants.py --fp8 > "$OUT/var_fp8.log" 2>&1; echo "rc $?"
grep -E "VARIANT|Error|error" "$OUT/var_fp8.log" | cut -c1-300
echo "### fp8 profile, PDL off $(date +%T)"
KIMIRAY_PDL=0 timeout 120 python3 bench/engine_bench.py --skip-hf --decode-only --quantization fp8 --batches 1 \
  --profile "$OUT/profile_fp8.txt" --json "$OUT/fp8_prof.json" > "$OUT/fp8_prof.log" 2>&1; echo "rc $?"
grep -A32 "graph replays" "$OUT/profile_fp8.txt" | cut -c1-60,150-250
echo "### end $(date +%T)"

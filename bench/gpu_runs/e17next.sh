#!/usr/bin/env bash
# Issue 17, what the next GPU call should measure (~6 min warm; run as `timeout 555 bash bench/gpu_runs/e17next.sh`):
# 1. where batch 1's 3.07 ms replay goes, kernel by kernel (engine_bench --profile: the b1 eager step and the b64
#    graph step), to pick the attention-side fusions (W_UK into the prologue; combine + W_UV; o_proj);
# 2. fp8 experts on the expert tiles vs the grouped fp8 GEMM at 16/32/64 rows in the engine, each batch twice
#    (the tiles are allowed for fp8 by a benchmark-only override), since the layer bench and the engine disagreed
#    at 64 rows (2026-12-06: tiles 297 vs grouped 330 µs a layer; engine replay 13.24 vs 12.91 ms).
set -uo pipefail
source "$(dirname "$0")/common.sh"
echo "### bf16 profile b1 / b64 $(date +%T)"
timeout 150 python3 bench/engine_bench.py --skip-hf --decode-only --batches 1 64 --profile "$OUT/profile.txt" \
  --json "$OUT/engine_profile.json" > "$OUT/engine_profile.log" 2>&1; echo "rc $?"
summary "$OUT/engine_profile.json" "$OUT/engine_profile.log"
head -40 "$OUT/profile.txt" | cut -c1-200
for mode in grouped tiles; do
  echo "### fp8 experts on the $mode path $(date +%T)"
  timeout 150 python3 -c 'import runpy, sys
import engine.model.decoder as decoder
if sys.argv[1] == "tiles":  # benchmark-only: let fp8 experts take the tiles past the GEMV limit
    decoder.DeepseekV3MoE._tiles = lambda self, x: x.shape[0] > decoder.MOE_GEMV_MAX_ROWS and decoder.use_triton(x)
    decoder.DeepseekV3MoE.parts_applicable = lambda self, x: x.shape[0] <= decoder.MOE_TILED_MAX_ROWS
sys.argv = ["engine_bench.py"] + sys.argv[2:]
runpy.run_path("bench/engine_bench.py", run_name="__main__")' "$mode" --skip-hf --decode-only --quantization fp8 \
    --batches 16 16 32 32 64 64 --json "$OUT/engine_fp8_$mode.json" > "$OUT/engine_fp8_$mode.log" 2>&1
  echo "rc $?"; summary "$OUT/engine_fp8_$mode.json" "$OUT/engine_fp8_$mode.log"
done
echo "### end $(date +%T)"

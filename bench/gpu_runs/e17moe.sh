#!/usr/bin/env bash
# Issue 17, big batches: the expert-tiled MoE kernels (engine/kernels/triton_moe_tiles.py) on one GPU, ~6 min warm.
# Their GPU tests (bf16 and fp8 against the references, a whole fused step of 12 rows), bench/moe_kernel_bench.py
# (one MoE layer per backend and row count in CUDA graphs, bf16 and fp8), then engine_bench decode on this tree and
# on the baseline tree carried as .gpu_base (the commit before the kernels) in the same call.
set -uo pipefail
source "$(dirname "$0")/common.sh"
BATCHES=${BATCHES:-1 8 16 32 64 128}
echo "### GPU tests $(date +%T)"
timeout 150 python3 -m pytest tests/test_gpu_kernels.py tests/test_gpu_fp8.py -q -s -p no:cacheprovider \
  -k "tiled or fast_decode_step or moe_gemvs or fused_decode_kernels" > "$OUT/gpu_tests.log" 2>&1
echo "tests rc $?"; grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | cut -c1-300 | tail -12
echo "### moe_kernel_bench $(date +%T)"
timeout 200 python3 bench/moe_kernel_bench.py --rows 1 4 8 16 32 64 128 --fp8 --json "$OUT/moe_kernel_bench.json" \
  2>&1 | tail -50 | cut -c1-200
echo "### engine_bench, this tree $(date +%T)"
# shellcheck disable=SC2086
timeout 170 python3 bench/engine_bench.py --skip-hf --decode-only --batches $BATCHES \
  --json "$OUT/engine_head.json" > "$OUT/engine_head.log" 2>&1; echo "rc $?"
summary "$OUT/engine_head.json" "$OUT/engine_head.log"
if [[ -d .gpu_base ]]; then
  echo "### engine_bench, baseline tree $(date +%T)"
  # shellcheck disable=SC2086
  (cd .gpu_base && PYTHONPATH=/tmp/site:$PWD timeout 150 python3 bench/engine_bench.py --skip-hf --decode-only \
    --batches $BATCHES --json "$OUT/engine_base.json" > "$OUT/engine_base.log" 2>&1; echo "rc $?")
  summary "$OUT/engine_base.json" "$OUT/engine_base.log"
fi
echo "### end $(date +%T)"

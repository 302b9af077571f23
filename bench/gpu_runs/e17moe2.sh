#!/usr/bin/env bash
# Issue 17, second expert-tiles call (~8 min warm): GPU tests of the tiles (longer timeout: first-use autotuning
# compiles every config), the MoE layer at few rows (GEMV vs tiles, bf16 and fp8: where the tiles should start),
# engine decode with the GEMV limit at 8 (batches 2 4 8 128 128: the second 128 is after every capture) and at 1
# (tiles from 2 rows), then FP8 decode on this tree and on the baseline tree (.gpu_base) in the same call.
set -uo pipefail
source "$(dirname "$0")/common.sh"
bench_with_gemv_limit() {  # LIMIT JSON ARGS...: engine_bench with MOE_GEMV_MAX_ROWS set (a benchmark-only override)
  local limit=$1 json=$2; shift 2
  python3 -c 'import runpy, sys
import engine.model.decoder as decoder
decoder.MOE_GEMV_MAX_ROWS = int(sys.argv[1])
sys.argv = ["engine_bench.py"] + sys.argv[2:]
runpy.run_path("bench/engine_bench.py", run_name="__main__")' "$limit" --skip-hf --decode-only --json "$json" "$@" \
    > "${json%.json}.log" 2>&1
  echo "rc $?"; summary "$json" "${json%.json}.log"
}
echo "### GPU tests $(date +%T)"
timeout 280 python3 -m pytest tests/test_gpu_kernels.py tests/test_gpu_fp8.py -q -s -p no:cacheprovider \
  -k "tiled or fast_decode_step or moe_gemvs" > "$OUT/gpu_tests.log" 2>&1
echo "tests rc $?"; grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | cut -c1-300 | tail -12
echo "### moe_kernel_bench $(date +%T)"
timeout 150 python3 bench/moe_kernel_bench.py --rows 1 2 3 4 6 8 16 64 --backends gemv tiled --fp8 \
  --json "$OUT/moe_kernel_bench.json" 2>&1 | python3 -c 'import json,sys
for line in sys.stdin:
    try: r = json.loads(line); print(r["weights"], r["rows"], r["backend"], r["us_per_layer"], r["GBps"])
    except Exception: print(line.rstrip()[:200])'
echo "### bf16 decode, GEMV limit 8 $(date +%T)"
bench_with_gemv_limit 8 "$OUT/engine_gemv8.json" --batches 2 4 8 128 128
echo "### bf16 decode, GEMV limit 1 $(date +%T)"
bench_with_gemv_limit 1 "$OUT/engine_gemv1.json" --batches 2 4 8
echo "### fp8 decode, this tree $(date +%T)"
timeout 150 python3 bench/engine_bench.py --skip-hf --decode-only --quantization fp8 --batches 1 8 64 \
  --json "$OUT/engine_fp8_head.json" > "$OUT/engine_fp8_head.log" 2>&1; echo "rc $?"
summary "$OUT/engine_fp8_head.json" "$OUT/engine_fp8_head.log"
echo "### fp8 decode, baseline tree $(date +%T)"
(cd .gpu_base && PYTHONPATH=/tmp/site:$PWD timeout 150 python3 bench/engine_bench.py --skip-hf --decode-only \
  --quantization fp8 --batches 1 8 64 --json "$OUT/engine_fp8_base.json" > "$OUT/engine_fp8_base.log" 2>&1; echo "rc $?")
summary "$OUT/engine_fp8_base.json" "$OUT/engine_fp8_base.log"
echo "### end $(date +%T)"

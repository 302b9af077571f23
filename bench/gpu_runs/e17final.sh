#!/usr/bin/env bash
# Issue 17, the expert tiles' tables in one call (~8 min warm): engine decode on this tree and the baseline tree
# (.gpu_base) in the same call, bf16 at 1-128 rows and fp8 at 1/8/64, then the tiles' GPU tests with what time is
# left. Run it as `timeout 540 bash bench/gpu_runs/e17final.sh` so the output comes back within a call's limit.
set -uo pipefail
source "$(dirname "$0")/common.sh"
decode() {  # TREE NAME TIMEOUT ARGS...
  local tree=$1 name=$2 limit=$3; shift 3
  echo "### $name $(date +%T)"
  (cd "$tree" && PYTHONPATH=/tmp/site:$PWD timeout "$limit" python3 bench/engine_bench.py --skip-hf --decode-only \
    --json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1; echo "rc $?")
  summary "$OUT/$name.json" "$OUT/$name.log"
}
BATCHES="1 2 4 8 16 32 64 128 128"
# shellcheck disable=SC2086
decode . engine_head 120 --batches $BATCHES
# shellcheck disable=SC2086
decode .gpu_base engine_base 110 --batches $BATCHES
decode . engine_fp8_head 110 --quantization fp8 --batches 1 8 64 64
decode .gpu_base engine_fp8_base 100 --quantization fp8 --batches 1 8 64 64
echo "### GPU tests $(date +%T)"
timeout 200 python3 -m pytest tests/test_gpu_kernels.py tests/test_gpu_fp8.py -q -s -p no:cacheprovider \
  -k "tiled or fast_decode_step or moe_gemvs" > "$OUT/gpu_tests.log" 2>&1
echo "tests rc $?"; grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | cut -c1-300 | tail -12
echo "### end $(date +%T)"

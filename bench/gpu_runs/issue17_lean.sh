#!/usr/bin/env bash
# Issue 17's core figures when little device time is left (~6 min warm): the forward/vision/kernel GPU tests,
# engine_bench on this tree (decode with run-ahead on and off, 8K/32K prefill, 131K in 8K and 32K chunks) and on
# the baseline tree (.gpu_base, carried) in the same run, then FP8 agreement if time remains. The b64 step breakdown
# and the kernel tables (eager b1 decode, b64 graph step, 8K prefill) go to breakdown_b64.txt / profile.txt; at
# most 8 files come back, so the baseline's and FP8's logs stay on the machine (their tails are printed).
set -uo pipefail
source "$(dirname "$0")/common.sh"
ARGS="--skip-hf --batches 1 8 32 64 --prefill 8192 32768 --longest 131070"
echo "### GPU tests $(date +%T)"
timeout 100 python3 -m pytest tests/test_gpu_forward.py tests/test_gpu_vision.py tests/test_gpu_kernels.py tests/test_gpu_engine_overlap.py -q -s \
  -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "tests rc $?"
grep -E "passed|failed|FAILED|Error:|vs fp32" "$OUT/gpu_tests.log" | cut -c1-300 | tail -12
echo "### engine_bench, this tree $(date +%T)"
timeout 200 python3 bench/engine_bench.py $ARGS --prefill-chunks 8192 32768 --overlap both \
  --breakdown "$OUT/breakdown.txt" --breakdown-batches 64 --profile "$OUT/profile.txt" \
  --json "$OUT/engine_head.json" > "$OUT/engine_head.log" 2>&1; echo "rc $?"
grep -v "^ " "$OUT/engine_head.log" | grep -v first_ids | cut -c1-300 | tail -12
echo "### engine_bench, baseline tree $(date +%T)"
(cd .gpu_base && PYTHONPATH=/tmp/site:$PWD timeout 110 python3 bench/engine_bench.py $ARGS \
  --json "$OUT/engine_base.json" > /tmp/engine_base.log 2>&1; echo "rc $?"; tail -3 /tmp/engine_base.log | cut -c1-300)
echo "### FP8 agreement $(date +%T)"
timeout 120 python3 bench/fp8_agreement.py --device cuda --batches 1 64 --prompts 8 --prompt-len 512 \
  --json "$OUT/fp8_agreement.json" > /tmp/fp8_agreement.log 2>&1; echo "rc $?"
tail -8 /tmp/fp8_agreement.log | cut -c1-300
echo "### end $(date +%T)"

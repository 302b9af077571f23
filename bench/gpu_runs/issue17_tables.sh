#!/usr/bin/env bash
# Issue 17's tables in one GPU call (~7 min on a warm H100): the GPU tests, engine_bench on this tree (decode with
# run-ahead on and off, 8K / 32K prefill, the 131K prompt in 8K and 32K chunks, the step breakdown at batch 1 and
# 64, kernel tables of the b1 eager decode, the b64 graph step and the 8K prefill) and on the baseline tree in the
# same run, then the FP8 agreement report (bf16 vs fp8 on the same random A3B weights, decode tok/s of both).
# The baseline tree must be carried as .gpu_base (ignored):
#   mkdir -p .gpu_base && git archive 7b4e40b | tar -x -C .gpu_base    # 7b4e40b: before the second wave
# GPU_TESTS narrows the tests when device time is short (the 22:32 run of 2026-12-05 used
#   GPU_TESTS="tests/test_gpu_forward.py tests/test_gpu_vision.py tests/test_gpu_kernels.py tests/test_gpu_engine_overlap.py").
# At most 8 files come back from a call: gpu_tests.log, engine_head.json/.log, breakdown_b1/_b64.txt, profile.txt,
# engine_base.json, fp8_agreement.json; the baseline's and FP8's logs stay on the machine (their tails are printed).
set -uo pipefail
source "$(dirname "$0")/common.sh"
ARGS="--skip-hf --batches 1 8 32 64 --prefill 8192 32768 --longest 131070"
echo "### GPU tests $(date +%T)"
# shellcheck disable=SC2086 # GPU_TESTS is a list of paths
timeout 150 python3 -m pytest ${GPU_TESTS:-tests/test_gpu_*.py} -q -s -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "tests rc $?"
grep -E "passed|failed|FAILED|Error:|LSE kernels working|vs fp32" "$OUT/gpu_tests.log" | cut -c1-300 | tail -20
echo "### engine_bench, this tree $(date +%T)"
timeout 200 python3 bench/engine_bench.py $ARGS --prefill-chunks 8192 32768 --overlap both \
  --breakdown "$OUT/breakdown.txt" --breakdown-batches 1 64 --profile "$OUT/profile.txt" \
  --json "$OUT/engine_head.json" > "$OUT/engine_head.log" 2>&1; echo "rc $?"
grep -v "^ " "$OUT/engine_head.log" | grep -v first_ids | cut -c1-300 | tail -16
if [[ -d .gpu_base ]]; then
  echo "### engine_bench, baseline tree $(date +%T)"
  (cd .gpu_base && PYTHONPATH=/tmp/site:$PWD timeout 110 python3 bench/engine_bench.py $ARGS \
    --json "$OUT/engine_base.json" > /tmp/engine_base.log 2>&1; echo "rc $?"; tail -3 /tmp/engine_base.log | cut -c1-300)
else
  echo "### no .gpu_base: the baseline is not measured (see the header)"
fi
echo "### FP8 agreement $(date +%T)"
timeout 120 python3 bench/fp8_agreement.py --device cuda --batches 1 64 --prompts 8 --prompt-len 512 \
  --json "$OUT/fp8_agreement.json" > /tmp/fp8_agreement.log 2>&1; echo "rc $?"
tail -8 /tmp/fp8_agreement.log | cut -c1-300
echo "### end $(date +%T)"

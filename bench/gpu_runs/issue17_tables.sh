#!/usr/bin/env bash
# Issue 17's tables in one GPU call (~7 min on a warm H100): engine_bench on this tree and on the baseline tree in
# the same run, every GPU test of this tree, then the FP8 agreement report (bf16 vs fp8 on the same random A3B
# weights, decode tok/s of both). The baseline tree must be carried as .gpu_base (ignored):
#   mkdir -p .gpu_base && git archive 7b4e40b | tar -x -C .gpu_base    # 7b4e40b: before the second wave
# Writes $OUT/engine_head.json, engine_base.json, gpu_tests.log, fp8_agreement.json (+ logs).
set -uo pipefail
source "$(dirname "$0")/common.sh"
ARGS="--skip-hf --batches 1 8 32 64 --prefill 8192 32768 --longest 131070"
echo "### GPU tests $(date +%T)"
timeout 150 python3 -m pytest tests/test_gpu_*.py -q -s -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "tests rc $?"
grep -E "passed|failed|FAILED|Error:|LSE kernels working|vs fp32" "$OUT/gpu_tests.log" | cut -c1-300 | tail -20
echo "### engine_bench, this tree $(date +%T)"
timeout 180 python3 bench/engine_bench.py $ARGS --prefill-chunks 8192 32768 --overlap both \
  --breakdown "$OUT/breakdown.txt" --breakdown-batches 1 64 \
  --json "$OUT/engine_head.json" > "$OUT/engine_head.log" 2>&1; echo "rc $?"
grep -v "^ " "$OUT/engine_head.log" | cut -c1-400 | tail -24
if [[ -d .gpu_base ]]; then
  echo "### engine_bench, baseline tree $(date +%T)"
  (cd .gpu_base && PYTHONPATH=/tmp/site:$PWD timeout 150 python3 bench/engine_bench.py $ARGS \
    --json "$OUT/engine_base.json" > "$OUT/engine_base.log" 2>&1; echo "rc $?")
  grep -v "^ " "$OUT/engine_base.log" | cut -c1-400 | tail -16
else
  echo "### no .gpu_base: the baseline is not measured (see the header)"
fi
echo "### FP8 agreement $(date +%T)"
timeout 150 python3 bench/fp8_agreement.py --device cuda --batches 1 64 --prompts 8 --prompt-len 512 \
  --json "$OUT/fp8_agreement.json" > "$OUT/fp8_agreement.log" 2>&1; echo "rc $?"
tail -20 "$OUT/fp8_agreement.log" | cut -c1-400
echo "### end $(date +%T)"

#!/usr/bin/env bash
# Issue 17 in one call when device time is short (~9 min on a warm H100): issue17_tables.sh (GPU tests, engine_bench
# on this tree and the baseline tree, FP8 agreement), then the screenshot TTFT bench. At most 8 files come back
# from a call: the logs go into one archive at the end (if the call is cut before, the tables' own files come back).
set -uo pipefail
bash "$(dirname "$0")/issue17_tables.sh" 2>&1 | cut -c1-600
export PYTHONPATH=/tmp/site:$PWD OUT=${OUT:-/tmp/out}
mkdir -p /tmp/vis
echo "### vision_ttft_bench $(date +%T)"
timeout 110 python3 bench/vision_ttft_bench.py --json /tmp/vis/vision_ttft.json --reps 3 > /tmp/vis/vision_ttft.log 2>&1
echo "rc $?"; grep -v "^ " /tmp/vis/vision_ttft.log | cut -c1-300 | tail -12
cp /tmp/vis/vision_ttft.json "$OUT/" 2>/dev/null
cd "$OUT" && tar czf logs.tgz ./*.log ./*.txt /tmp/vis/vision_ttft.log 2>/dev/null && rm -f ./*.log ./*.txt
ls "$OUT"

#!/usr/bin/env bash
# Online serving benchmark on one GPU (issue 17 item 6): bench/serving_bench.py on the full-size A3B shapes with
# random bf16 weights, both workloads (random 1,024/128 and mixed with 25 % 1280x720 screenshots), Poisson rates
# 2 4 8 12 16 + one bisection step of the 1 s p99-TTFT bracket + inf. ~5 s of arrivals per rate and a 55 s budget
# per workload (rates left once it is spent are recorded as skipped): ~2.5 min with model build and warm-up.
# Writes $OUT/serving_bench.json (all rows, capacity per workload, markdown tables) and $OUT/serving_bench.log.
set -uo pipefail
source "$(dirname "$0")/common.sh"
timeout 240 python3 bench/serving_bench.py --device cuda --workloads random mixed \
  --rates 2 4 8 12 16 inf --duration 5 --min-requests 12 --inf-requests 64 --search 1 \
  --budget-s 55 --rate-timeout 20 --warmup-ladder 1 2 4 8 16 24 32 48 64 \
  --json "$OUT/serving_bench.json" 2>&1 | tee "$OUT/serving_bench.log"
rc=${PIPESTATUS[0]}
echo "serving_bench exit code: $rc (JSON: $OUT/serving_bench.json)"
exit "$rc"

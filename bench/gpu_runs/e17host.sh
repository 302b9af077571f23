#!/usr/bin/env bash
# Big batches: host work per step (issue 17 item 2) on one GPU, ~3 min on a warm H100:
# 1. GPU tests: tests/test_gpu_engine_overlap.py (run-ahead with CUDA graphs == sequential steps, bit for bit, at
#    5 / 40 / 70 rows, with a stop string and an abort in flight; seeded top-p rows) and the decode-graph tests of
#    tests/test_gpu_kernels.py (graphs == eager, graphs valid across the fused-path threshold). -> $OUT/gpu_tests.log
# 2. bench/host_step_bench.py --device cuda: the real engine on the tiny checkpoint (bf16, real CUDA graphs, the
#    device work is tiny, so a step is mostly host time), run-ahead off vs on, batch 64 / 32 / 1.
#    -> $OUT/e17host_host_step.json
# 3. bench/engine_bench.py --skip-hf --decode-only --batches 1 8 32 64 --overlap both: A3B shapes, decode with
#    run-ahead off (the baseline, same process) then on; tok/s, ms/step, graph replay ms, bandwidth bound, and
#    whether greedy ids agree. -> $OUT/e17host.json
set -uo pipefail
source "$(dirname "$0")/common.sh"
git log --oneline -1 2>/dev/null
timeout 150 python3 -m pytest tests/test_gpu_engine_overlap.py tests/test_gpu_kernels.py -q -s -p no:cacheprovider \
  -k "overlap or run_ahead or cuda_graph_decode or graphs_stay_valid" 2>&1 | tee "$OUT/gpu_tests.log" \
  | grep -v "^$" | tail -30
test_rc=${PIPESTATUS[0]}
echo "GPU tests exit code: $test_rc"
timeout 120 python3 bench/host_step_bench.py --device cuda --batches 64 32 1 --steps 96 \
  --json "$OUT/e17host_host_step.json" 2>&1 | tail -60 | tee "$OUT/e17host_host_step.log"
echo "host_step_bench exit code: ${PIPESTATUS[0]}"
timeout 300 python3 bench/engine_bench.py --skip-hf --decode-only --batches 1 8 32 64 --overlap both \
  --json "$OUT/e17host.json" 2>&1 | grep -v "^ " | tee "$OUT/e17host_engine_bench.log" | cut -c1-400 | tail -20
bench_rc=${PIPESTATUS[0]}
echo "engine_bench exit code: $bench_rc (JSON: $OUT/e17host.json)"
python3 - "$OUT/e17host.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for key in ("decode_no_overlap", "decode"):
    for row in r.get(key, []):
        print(f"{key:18s} batch {row['batch']:3d}: {row['tok_per_s']:8.1f} tok/s  {row['ms_per_step']:7.3f} ms/step  "
              f"graph {row['graph_replay_ms']} ms  bound {row['bandwidth_bound_tok_per_s']}  "
              f"same ids {row.get('greedy_ids_equal_no_overlap', '-')}")
PY
exit $(( test_rc != 0 ? test_rc : bench_rc ))

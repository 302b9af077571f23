#!/usr/bin/env bash
# One decoder forward + long prompts (issue 17 items 4 and 1) on one GPU, ~3-4 min on a warm H100:
# 1. GPU tests: tests/test_gpu_forward.py (prefill LSE kernels at q/k 192 / v 128 against the reference, chunk
#    attention vs lower-right SDPA, chunked prefill + prefix hit and a mixed decode+prefill step on CUDA kernels vs
#    reference kernels) and tests/test_gpu_kernels.py (fused decode backend vs the modules on reference kernels,
#    CUDA-graph decode == eager). -> $OUT/gpu_tests.log
# 2. bench/prefill_attention_bench.py: one A3B layer's attention over a 128K prompt in 8K / 32K chunks, old
#    lower-right SDPA vs LSE-merged prefix + chunk per kernel (cudnn / flash / efficient), + prefix re-expansion
#    cost. -> $OUT/prefill_attention.json
# 3. bench/engine_bench.py --skip-hf --batches 1 32 --prefill 8192 32768 --longest 131070 --prefill-chunks 8192
#    32768: decode b1/b32 (regression check of the fused backend), 8K / 32K prefill, the 131,070-token prompt with
#    8K and 32K largest chunks, peak memory of each. -> $OUT/engine_bench.json
# KIMIRAY_PREFILL_ATTENTION=flash,cudnn,efficient (say) changes the LSE kernel order.
set -uo pipefail
source "$(dirname "$0")/common.sh"
git log --oneline -1 2>/dev/null
timeout 120 python3 -m pytest tests/test_gpu_forward.py tests/test_gpu_kernels.py -q -s -p no:cacheprovider \
  -k "not grouped_gemm_experts" 2>&1 | tee "$OUT/gpu_tests.log" | grep -v "^$" | tail -40
test_rc=${PIPESTATUS[0]}
echo "GPU tests exit code: $test_rc"
timeout 60 python3 bench/prefill_attention_bench.py --tokens 131072 --chunks 8192 32768 \
  --json "$OUT/prefill_attention.json" 2>&1 | tee "$OUT/prefill_attention.log"
echo "prefill_attention_bench exit code: ${PIPESTATUS[0]}"
timeout 240 python3 bench/engine_bench.py --skip-hf --batches 1 32 --prefill 8192 32768 --longest 131070 \
  --prefill-chunks 8192 32768 --json "$OUT/engine_bench.json" 2>&1 | grep -v "^ " | tee "$OUT/engine_bench.log" | tail -30
bench_rc=${PIPESTATUS[0]}
echo "engine_bench exit code: $bench_rc (JSON: $OUT/engine_bench.json)"
exit $(( test_rc != 0 ? test_rc : bench_rc ))

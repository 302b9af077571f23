#!/usr/bin/env bash
# Issue 17, programmatic dependent launch (run as `timeout 570 bash bench/gpu_runs/e17pdl.sh`): GPU tests of the
# decode kernels with PDL on, then decode bf16 and fp8 on this tree with PDL on and off (KIMIRAY_PDL=0: the
# previous launches) in the same call, and the batch-1 kernel table with PDL on.
set -uo pipefail
source "$(dirname "$0")/common.sh"
python3 -c 'import triton, torch; print("triton", triton.__version__, "torch", torch.__version__)
from engine.kernels import triton_pdl; x = torch.zeros(1, device="cuda"); print("pdl enabled", triton_pdl.enabled(x))'
echo "### gpu tests $(date +%T)"
timeout 150 python3 -m pytest -q -x -m gpu tests/test_gpu_kernels.py -k "fused_decode_kernels or fast_decode_step or cuda_graph" \
  -p no:cacheprovider 2>&1 | grep -E "Error|assert|passed|failed" | head -20
for pdl in 1 0; do
  prof=(); [ $pdl = 1 ] && prof=(--profile "$OUT/profile_pdl.txt")
  echo "### bf16 pdl=$pdl $(date +%T)"
  KIMIRAY_PDL=$pdl timeout 150 python3 bench/engine_bench.py --skip-hf --decode-only \
    --batches 1 2 8 32 64 64 "${prof[@]}" --json "$OUT/bf16_pdl$pdl.json" > "$OUT/bf16_pdl$pdl.log" 2>&1; echo "rc $?"
  summary "$OUT/bf16_pdl$pdl.json" "$OUT/bf16_pdl$pdl.log"
done
for pdl in 1 0; do
  echo "### fp8 pdl=$pdl $(date +%T)"
  KIMIRAY_PDL=$pdl timeout 110 python3 bench/engine_bench.py --skip-hf --decode-only \
    --quantization fp8 --batches 1 32 64 64 --json "$OUT/fp8_pdl$pdl.json" > "$OUT/fp8_pdl$pdl.log" 2>&1; echo "rc $?"
  summary "$OUT/fp8_pdl$pdl.json" "$OUT/fp8_pdl$pdl.log"
done
grep -A30 "graph replays" "$OUT/profile_pdl.txt" | cut -c1-60,150-250
echo "### end $(date +%T)"

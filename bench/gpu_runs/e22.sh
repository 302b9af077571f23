#!/usr/bin/env bash
# e22 / issue 22 on the GPU machine: several ModelServer replicas of the real Serve app (deploy/
# ray_config.gpus-one-host.yaml) on full-size A3B shapes with random bf16 weights: scaling 1 -> N replicas,
# failover (a replica SIGKILLed under load), session affinity, autoscaling 1 -> N -> 1. Runs from the repo root;
# results (JSON + log) under $OUT/. docs/multi_gpu.md says what each table means.
#
# Needs what issue 18's runs install (branch e18, bench/gpu_serve/README.md): the Serve stack unpacked into
# /tmp/site by bench/gpu_serve/install.sh (the earlier run(s) carried .gpu_serve/part1 + .whl, then part2), and
# bench/gpu_serve/a3b_checkpoint.py, which writes the random checkpoint once (reused while the machine is warm).
#
# On 2, 4 or 8 GPUs (nvidia-h100-x2/-x4/-x8): one replica per GPU, --replicas 1 2 ... N, the full-depth checkpoint.
# On ONE GPU: two replicas share it (--gpu-fraction 0.5, each with a fixed KV cache) to check failover, affinity
# and autoscaling on the real engine; the throughput of that run does not scale (one GPU) and is not reported as
# scaling. Below 120 GB of GPU memory two full-depth replicas don't fit, so the 1-GPU check uses a shallower
# checkpoint (E22_LAYERS, default 12 of 27 layers; same widths, experts and vocabulary).
# Knobs: E22_PHASES (default "scaling failover affinity autoscale"), E22_PHASE_S (10), E22_ARGS (more flags).
set -uo pipefail
# NVLink multicast off (the machines' notes: it can take a shared host's GPUs out of service); the bench also
# passes these to every Ray worker. Our replicas use no collectives; this only makes sure nothing turns it on.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/e22-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v "already exists" || true
export PYTHONPATH=/tmp/site:$PWD
if [[ ! -f bench/gpu_serve/install.sh ]]; then
  echo "[e22] bench/gpu_serve/ (branch e18) is not in this tree: merge e18 first"; exit 1
fi
if ! bash bench/gpu_serve/install.sh 2>&1 | tee "$OUT/e22_install.log"; then
  echo "[e22] the Serve stack is not installed (see $OUT/e22_install.log): nothing measured"; exit 1
fi
grep -q "still missing" "$OUT/e22_install.log" && { echo "[e22] carry the missing part first"; exit 1; }
python3 -c "import ray, ray.serve, fastapi, httpx" || { echo "[e22] ray/serve do not import"; exit 1; }

nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -12
GPUS=$(nvidia-smi -L | wc -l)
MEM_MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
PHASE_S=${E22_PHASE_S:-10}
PHASES=${E22_PHASES:-scaling failover affinity autoscale}
if (( GPUS >= 2 )); then
  LAYERS=${E22_LAYERS:-}
  REPLICAS=$(python3 -c "n=$GPUS; print(' '.join(str(k) for k in (1, 2, 4, 8) if k <= n))")
  MODE=(--replicas $REPLICAS --ingress $(( GPUS * 2 )) --load-procs-per-replica 1)
else
  LAYERS=${E22_LAYERS:-$( (( MEM_MB >= 120000 )) || echo 12)}
  MODE=(--replicas 1 2 --gpu-fraction 0.5 --engine '{"cache_tokens": 131072}' --ingress 2)
fi
CKPT=.gpu_serve/a3b${LAYERS:+-l$LAYERS}
echo "[e22] $GPUS GPU(s) of ${MEM_MB} MiB; checkpoint $CKPT (layers: ${LAYERS:-27}); phases: $PHASES"
df -h . | tail -1
started=$(date +%s)
if ! python3 bench/gpu_serve/a3b_checkpoint.py "$CKPT" ${LAYERS:+--layers $LAYERS} 2>&1 | tail -3; then
  echo "[e22] could not write the checkpoint"; exit 1
fi
echo "[e22] checkpoint ready after $(( $(date +%s) - started )) s"
# shellcheck disable=SC2086 # PHASES and E22_ARGS are lists
timeout -k 30 540 python3 bench/multi_gpu_bench.py --model "$PWD/$CKPT" "${MODE[@]}" --phases $PHASES \
  --phase-s "$PHASE_S" --warmup-s 5 --concurrency-per-replica 32 --max-tokens 128 --prompt-chars 2000 \
  --sessions 16 --turns 4 --doc-chars 8000 --tasks 8 --failover-before-s 8 --failover-settle-s 10 \
  --upscale-delay-s 5 --downscale-delay-s 20 --metrics-interval-s 2 --look-back-period-s 6 \
  --autoscale-low-s 5 --autoscale-hold-s 5 --autoscale-timeout-s 150 --deploy-timeout-s 240 \
  --json "$OUT/e22_multi_gpu.json" ${E22_ARGS:-} 2>&1 | grep -v "^\s*$" | tee "$OUT/e22_multi_gpu.log"
status=${PIPESTATUS[0]}
echo "[e22] exit status $status after $(( $(date +%s) - started )) s; results: $OUT/e22_multi_gpu.json"
exit "$status"

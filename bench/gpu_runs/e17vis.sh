#!/usr/bin/env bash
# Screenshot TTFT (issue 17 item 5) on one GPU, ~2-3 min on a warm H100:
# 1. tests/test_gpu_vision.py: device preprocessing on CUDA equals the host processor bit for bit (1280x720,
#    1920x1080, a tall image, a centre crop); the CUDA RoPE path vs the real-arithmetic reference; MoonViT bf16
#    SDPA (PyTorch's choice = default, and cuDNN first) and flash varlen vs a per-image fp32 reference on 5
#    distinct grids at head_dim 72 (cuDNN and varlen really ran); the tiny engine on CUDA: device pixels == host pixels
#    (greedy tokens), resent PNG = vision-cache hit. -> $OUT/test_gpu_vision.log
# 2. bench/vision_ttft_bench.py on the random A3B model: host-side preprocessing (main's path vs host vs device
#    mode), screenshot TTFT split into preprocess / device pixels / vision / rest for image_pixels=host vs device
#    at 1280x720 and 1920x1080 (PNG data URLs and PIL images), a resent screenshot (vision-cache hit at
#    admission), then MoonViT attention backends (sdpa default, cuDNN first, forced flash/cudnn/efficient, FA3,
#    varlen; first call at a new grid per backend) and the top CUDA ops of one request. The JSON is rewritten
#    after every figure.
#    -> $OUT/vision_ttft.json, $OUT/vision_ttft.log
set -uo pipefail
source "$(dirname "$0")/common.sh"
timeout 60 python3 -m pytest tests/test_gpu_vision.py -x -q -s -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu_vision.log"
test_rc=${PIPESTATUS[0]}
echo "test_gpu_vision exit code: $test_rc"
timeout 150 python3 bench/vision_ttft_bench.py --json "$OUT/vision_ttft.json" --reps 5 2>&1 | tee "$OUT/vision_ttft.log"
bench_rc=${PIPESTATUS[0]}
echo "vision_ttft_bench exit code: $bench_rc (JSON: $OUT/vision_ttft.json)"
exit $(( test_rc != 0 ? test_rc : bench_rc ))

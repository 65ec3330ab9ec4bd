#!/usr/bin/env bash
# GPU checks for when a CUDA machine is available (at most 5 minutes: each step has a timeout):
#   1. the CUDA-only tests (kernel path bit-identical to SDPA for every backend, exact lse,
#      images unchanged by capture, model CPU offload);
#   2. bench_capture.py with the real SD3.5 medium and large transformer shapes (random weights),
#      1024x1024, bf16.
# Usage: bash benchmarks/gpu_check.sh OUT_DIR      (writes *.txt tables and *.json figures there)
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)" | tee -a "$out/gpu.txt"

status=0
timeout 60 python -m pytest -q tests/test_cuda.py 2>&1 | tee "$out/test_cuda.txt" || status=1
timeout 110 python benchmarks/bench_capture.py --preset sd35-medium --steps 6 --repeats 3 \
    --json "$out/sd35-medium.json" 2>&1 | tee "$out/sd35-medium.txt" || status=1
timeout 130 python benchmarks/bench_capture.py --preset sd35-large --steps 4 --repeats 2 \
    --json "$out/sd35-large.json" 2>&1 | tee "$out/sd35-large.txt" || status=1
exit $status

#!/usr/bin/env bash
# GPU checks for a CUDA machine, unattended, in under 5 minutes: every step is bounded by what is left
# of a 280 s budget (GPU_CHECK_BUDGET_S), and a step that fails or runs out does not stop the others.
#   1. versions: GPU, torch, CUDA, cuDNN, diffusers, transformers, and what torch._fused_sdp_choice
#      answers for SD3.5 medium's joint attention (bf16, (2, 24, 4429, 64)), plainly and with
#      TORCH_CUDNN_SDPA_DEPRIORITIZED=1;
#   2. tests/test_cuda.py: every capture path returns SDPA's output bit for bit under every backend
#      and dtype, exact probabilities, images unchanged by capture, model CPU offload (-rs lists the
#      forced paths that failed their self-check here, with the reason);
#   3. bench_capture.py --preset sd35-medium --kernel-report, plainly and with
#      TORCH_CUDNN_SDPA_DEPRIORITIZED=1: per backend and dtype what SDPA picks, the path the capture
#      takes and its self-check verdicts; then the time of stock and of each path (kernel-lse,
#      side-lse, chunked), interleaved, with the ratio to stock;
#   4. a summary of the ratios per path for both settings;
#   5. only with GPU_CHECK_CONCEPTS=1 (raise GPU_CHECK_BUDGET_S by about 300 for it): bench_concepts.py
#      at sd35-medium and flux-dev shapes (capture + 8 concepts against stock, the concept stream in
#      float32 over the bf16 model).
# Usage: bash benchmarks/gpu_check.sh OUT_DIR      (writes *.txt logs and *.json figures there;
#        PYTHON=/path/to/python picks the interpreter, default python3)
#        GPU_CHECK_CONCEPTS=1 GPU_CHECK_BUDGET_S=580 bash benchmarks/gpu_check.sh OUT_DIR   (with step 5)
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -f "$out"/sd35-medium*.json  # no stale figures in the summary
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
budget=${GPU_CHECK_BUDGET_S:-280}
# The interpreter that holds torch: $PYTHON, else python3 (GPU images often have no plain `python`).
py=${PYTHON:-$(command -v python3 || command -v python)}
status=0

step() {  # step NAME CAP_SECONDS CMD...: CMD under a timeout of min(CAP, time left), logged to $out/NAME.txt
    local name=$1 cap=$2
    shift 2
    local left=$((budget - SECONDS))
    local t=$((cap < left ? cap : left))
    echo "=== $name (timeout ${t}s, ${SECONDS}s elapsed) ==="
    if ((t < 10)); then
        echo "skipped: the time budget is spent" | tee "$out/$name.txt"
        status=1
        return
    fi
    timeout --kill-after=5 "$t" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    if ((rc != 0)); then
        echo "=== $name: exit $rc$( ((rc == 124)) && echo ' (timed out)') ==="
        status=1
    fi
}

versions='
import os, torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version())
for name in ("diffusers", "transformers"):
    try:
        print(name, __import__(name).__version__)
    except ImportError as exc:
        print(name, "MISSING:", exc)
from attention_map_diffusers.capture.kernels import backend_name, sdpa_backend
q = torch.randn(2, 24, 4429, 64, device="cuda", dtype=torch.bfloat16)
print("SD3.5-medium joint attention, bf16 (2, 24, 4429, 64): torch._fused_sdp_choice ->",
      backend_name(sdpa_backend(q, q, q, None)), "| TORCH_CUDNN_SDPA_DEPRIORITIZED =",
      os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED", "(unset)"))
'

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt" || true
step versions 30 "$py" -c "$versions"
step versions-deprioritized 30 env TORCH_CUDNN_SDPA_DEPRIORITIZED=1 "$py" -c "$versions"
step test_cuda 90 "$py" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py
bench=("$py" benchmarks/bench_capture.py --preset sd35-medium --steps 6 --repeats 3 --skip-fullmatrix --kernel-report)
step sd35-medium 90 "${bench[@]}" --json "$out/sd35-medium.json"
step sd35-medium-deprioritized 90 env TORCH_CUDNN_SDPA_DEPRIORITIZED=1 "${bench[@]}" \
    --json "$out/sd35-medium-deprioritized.json"

summary='
import json, os, sys
runs = {}
for label, name in (("plain", "sd35-medium"), ("DEPRIORITIZED=1", "sd35-medium-deprioritized")):
    path = os.path.join(sys.argv[1], name + ".json")
    if os.path.exists(path):
        with open(path) as fh:
            runs[label] = json.load(fh)
if not runs:
    sys.exit("no benchmark figures were written")
row = "%-22s" + "%30s" * len(runs)
print(row % ("ratio vs stock", *runs))
print(row % ("method=auto takes", *(str(r["auto_path"]) for r in runs.values())))
for key in ("kernel", "side", "chunked", "capture"):
    cells = []
    for r in runs.values():
        ratio = r.get("ratio_%s_vs_stock" % key)
        path = r["auto_path"] if key == "capture" else (r["paths"].get(key) or {}).get("path")
        cells.append("not run" if ratio is None else "%.3f (%s)" % (ratio, path))
    print(row % (key, *cells))
print(row % ("identical to stock", *(str(r["capture_output_identical_to_stock"]) for r in runs.values())))
'
step summary 20 "$py" -c "$summary" "$out"
if [[ ${GPU_CHECK_CONCEPTS:-0} == 1 ]]; then
    for preset in sd35-medium flux-dev; do
        step "concepts-$preset" 150 "$py" benchmarks/bench_concepts.py --preset "$preset" --steps 6 --repeats 3 \
            --json "$out/concepts-$preset.json"
    done
fi
echo "=== done in ${SECONDS}s, status $status ==="
exit $status

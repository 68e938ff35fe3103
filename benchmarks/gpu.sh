#!/usr/bin/env bash
# The benchmarks on a GPU: run on a machine with an NVIDIA GPU, from the repository root, with a CUDA build of torch
# in the project's environment (TORCH_SPEC=torch bash scripts/setup.sh where the machine can download it; a machine
# without internet needs the environment carried to it). Writes every result under $GPU_OUT (default
# benchmarks/results/gpu/), beside nvidia-smi's description of the card, and exits non-zero on the first failure.
#
#   bash benchmarks/gpu.sh            # all of it (about 20-40 min on one H100-class card, most of it bench_scaling)
#   GPU_QUICK=1 bash benchmarks/gpu.sh  # the network and ROI parts only, at their smoke sizes (a few minutes)
#
# What runs:
#   1. bench_inference_network.py --device cuda --compile: every bundle's network plain, folded + channels_last,
#      bfloat16 autocast and torch.compile, against the card's measured 8192^2 float32 matmul rate;
#   2. bench_scannet.py --device cuda --paper-roi --skip-slide: FCN against patch-by-patch scanning on one ROI,
#      with the paper's own Table 4 comparison (full width, a 2868 px ROI; the paper measured 0.018 against
#      0.975 min, 54x);
#   3. bench_segmitos.py --device cuda --precisions fp32,amp: whole HPFs against tiles, float32 and float16 AMP;
#   4. bench_scaling.py (not with GPU_QUICK): every bundle as users run it, on 4096-16384 px phantoms; the bundles
#      pick the GPU themselves (their configs' device, lp 83, batch size 4, AMP and TTA on CUDA).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${GPU_OUT:-benchmarks/results/gpu}
export PYTHONPATH="$PWD/common${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
ulimit -s 32768 2>/dev/null || true   # MONAI imports the Deploy SDK (holoscan), which warns below this

"$PYTHON" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"benchmarks/gpu.sh: torch {torch.__version__} sees no CUDA device; run it on a GPU machine with a CUDA "
             "build of torch (TORCH_SPEC=torch bash scripts/setup.sh)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}", flush=True)
EOF
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" \
    || echo "nvidia-smi not found: the card is named in each JSON instead" > "$OUT/nvidia-smi.csv"

quick=()
[[ "${GPU_QUICK:-0}" == 1 ]] && quick=(--quick)
step() { echo "== $*" >&2; "$@"; }

only=()
[[ "${GPU_QUICK:-0}" == 1 ]] && only=(--only scannet,segmitos --repeats 3)
step "$PYTHON" benchmarks/bench_inference_network.py --device cuda --compile "${only[@]}" \
    --out "$OUT/inference_network.json"
step "$PYTHON" benchmarks/bench_scannet.py --device cuda --paper-roi --skip-slide "${quick[@]}" \
    --out "$OUT/scannet.json"
step "$PYTHON" benchmarks/bench_segmitos.py --device cuda --precisions fp32,amp "${quick[@]}" \
    --out "$OUT/segmitos.json"
if [[ "${GPU_QUICK:-0}" != 1 ]]; then
    step "$PYTHON" benchmarks/bench_scaling.py --sizes 4096,8192,16384 --fresh --out "$OUT/scaling.json"
fi
echo "gpu.sh: results in $OUT" >&2

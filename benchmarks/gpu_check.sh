#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU (DESIGN.md section 6): build the extension
# with CUDA for this machine's torch, run the CUDA tests and the native tests, then the op and
# U-Net benchmarks on the GPU. Results go to ${OUT:-gpu_results}/. Meant to finish in < 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"

export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
export FASTDDPM_CUDA=1 MAX_JOBS=${MAX_JOBS:-8}
start=$(date +%s)
"$PY" setup.py build_ext --inplace 2>&1 | tail -n 30 | tee "$OUT/build.txt"
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/build.txt"
"$PY" -c "from fastddpm import ops; print('native:', ops.native_status())" | tee -a "$OUT/build.txt"

"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_ops.py tests/test_native_ops.py 2>&1 | tail -n 40 \
  | tee "$OUT/tests.txt"
"$PY" -m benchmarks --device cuda --rounds 7 --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.md"

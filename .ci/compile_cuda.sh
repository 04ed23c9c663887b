#!/usr/bin/env bash
# Compile every .cu file of csrc/ with nvcc for sm_80 and sm_90 against the installed torch's
# headers (object files only: no GPU is needed). Fails on any compile error or warning.
# Usage: .ci/compile_cuda.sh [python]   (the python whose torch to compile against)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python}
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null; then echo "compile_cuda: nvcc not found" >&2; exit 1; fi
read -r TORCH_INC PY_INC NV_INC < <("$PY" - <<'PYEOF'
import os, sysconfig, torch
root = os.path.dirname(torch.__file__)
print(os.path.join(root, "include"), sysconfig.get_paths()["include"],
      os.path.abspath(os.path.join(root, "..", "nvidia", "cu13", "include")))
PYEOF
)
out=$(mktemp -d)
status=0
for cu in $(grep '\.cu$' csrc/sources.txt); do
  echo "compile_cuda: $cu"
  start=$(date +%s)
  if ! "$NVCC" -c "$cu" -o "$out/$(basename "$cu").o" -std=c++20 -O3 --fmad=false \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
      -I csrc/include -I "$TORCH_INC" -I "$TORCH_INC/torch/csrc/api/include" -I "$PY_INC" -I "$NV_INC" \
      -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1 --expt-relaxed-constexpr \
      -Xcompiler -fPIC -Werror all-warnings -diag-suppress 20012 2>&1; then
    status=1
  fi
  echo "compile_cuda: $cu done in $(( $(date +%s) - start )) s"
done
rm -rf "$out"
exit $status

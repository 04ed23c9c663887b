#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU (DESIGN.md section 6). Builds the extension
# with CUDA for that machine's torch, runs the GPU tests (native CUDA kernels, Triton kernels, the
# sampler), then the GPU benchmarks (ops, then the sampler, whose torch.compile row comes last).
# Results go to ${OUT:-gpu_results}/. Its run time on an H200: docs/performance.md#measurements-behind-the-code.
#
#     bash benchmarks/gpu_check.sh [all | a comma list of op-tests,op-bench,sampler-tests,sampler-bench,
#                                   sharded-sampling]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
WHAT=${1:-all}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step() { echo "== $1 ($(date +%T))"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

step build
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
export FASTDDPM_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} FASTDDPM_CUDA_ARCHS=${FASTDDPM_CUDA_ARCHS:-90}
start=$(date +%s)
timeout 150 "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; echo "build rc=$? in $(( $(date +%s) - start )) s" | tee "$OUT/build.txt"
tail -n 15 "$OUT/build.log" >>"$OUT/build.txt"
"$PY" -c "from fastddpm import ops; print('native:', ops.native_status()); print('triton:', ops.triton_status())" 2>&1 | tee -a "$OUT/build.txt"

has() { [[ $WHAT == all || " ${WHAT//,/ } " == *" $1 "* ]]; }
if has op-tests; then
  step "op tests"
  # every hypothesis shape would be autotuned afresh: the tests take each space's first config
  FASTDDPM_TRITON_AUTOTUNE=0 timeout 130 "$PY" -m pytest -q -p no:cacheprovider --hypothesis-seed=0 \
    tests/test_cuda_ops.py tests/test_triton_ops.py ${OP_TESTS_K:+-k "$OP_TESTS_K"} -p no:logging -rf --tb=short \
    2>&1 | tee "$OUT/tests_ops.txt" | tail -n 60
fi
if has sampler-tests; then
  step "sampler tests"
  timeout 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_sampler_gpu.py -p no:logging -rf --tb=short 2>&1 \
    | tee "$OUT/tests_sampler.txt" | tail -n 40
fi
if has op-bench; then
  step "op benchmarks"
  timeout 150 "$PY" -m benchmarks --device cuda --only ops --rounds 3 --out "$OUT/ops" 2>&1 | tee "$OUT/bench_ops.txt"
fi
if has sampler-bench; then
  step "sampler benchmarks"
  timeout ${SAMPLER_BENCH_LIMIT:-300} "$PY" -m benchmarks --device cuda --only sampler --out "$OUT/sampler" \
    2>&1 | grep -v "^DEBUG" | tee "$OUT/bench_sampler.txt"
fi
if has sharded-sampling; then
  step "sharded sampling (NCCL, 1 vs 2 processes; per-image seeds: same noise, images equal to rounding)"
  # NCCL takes one device per rank (distributed.rank_device: cuda:LOCAL_RANK), so this needs 2 GPUs
  if (( $(nvidia-smi -L | wc -l) < 2 )); then
    echo "sharded sampling: skipped, it needs 2 GPUs (NCCL refuses two ranks on one device)" | tee -a "$OUT/sharded.txt"
  else
    for src in philox generator; do
      for w in 1 2; do
        timeout 120 "$PY" -m torch.distributed.run --nnodes 1 --nproc_per_node $w \
          --master_addr 127.0.0.1 --master_port $((29500 + w)) -m fastddpm.cli sample -n 64 --steps 50 --seed 0 \
          --device cuda --batch-size 16 --format npy --shard-size 16 --noise-source $src --quiet \
          --out-dir "$OUT/sharded_${src}_$w" 2>&1 | tail -n 3 | tee -a "$OUT/sharded.txt"
      done
      "$PY" -c "import numpy as np, sys; a, b = (np.concatenate([np.load(f'{d}/shard_{i:06d}-{i + 15:06d}.npy') \
for i in range(0, 64, 16)]) for d in sys.argv[1:]); print('$src 1 vs 2 ranks: max |diff|', abs(a - b).max())" \
        "$OUT/sharded_${src}_1" "$OUT/sharded_${src}_2" 2>&1 | tee -a "$OUT/sharded.txt"
    done
  fi
fi
step done

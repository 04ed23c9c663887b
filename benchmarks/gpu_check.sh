#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU (docs/gpu.md). Builds the extension with CUDA
# for that machine's torch, then runs the phases asked for; results go to ${OUT:-gpu_results}/: each
# phase's raw output and a short readable summary (PHASE.md), phases.md (each phase's limit, time
# and exit status) and summary.md, which collects the numbers of every phase that ran.
#
#     bash benchmarks/gpu_check.sh [default | all | a comma list of phases]
#
# The default run (no argument) is what the next GPU session runs; it fits 10 minutes on an H200:
# its phases share a budget of GPU_CHECK_BUDGET seconds (default 570), each runs under its own
# limit or what is left of the budget (less 15 s for the summary), whichever is smaller, and a phase
# with under 10 s left is skipped. Expected times on an H200 (estimates from the runs in
# docs/gpu.md; [its own limit]), in the order they run:
#   build       ~50 s [150]  the extension for sm_90 (33-49 s in the earlier runs)
#   new-tests   ~20 s [60]   the GPU tests added since the last GPU run (per-image seeds on CUDA)
#   fast-256    ~95 s [130]  cifar10, 256 images x 1000 steps, bf16, channels_last, Philox, CUDA graphs,
#                            torch.compile default mode: graphs of 1 step (compile ~20 s, capture, a
#                            first and a timed run of ~11 s), of 20 steps (the compiled model reused);
#                            the eager forward at batch 256 with each op backend's group norm
#               ~120 s [150] then max-autotune (its conv/GEMM templates; no cudagraphs inside the
#                            sampler's graphs), graphs of 1 step: its autotuning is the least known part
#   latency-1   ~55 s [75]   cifar10 batch 1, 200 steps: ms a step eager, with CUDA graphs (fp32, bf16),
#                            compiled with CUDA graphs; the eager forward with each op backend
#   train       ~60 s [90]   the benchmark suite's train section on CUDA
#   diffusers   ~140 s [150] the suite's diffusers section on CUDA, its cifar10 case at batch 64 for 200
#                            steps (the section's own: 1000), 2 calls a setting: DDPMPipeline against
#                            accelerate(pipe) and sample(), eager fp32, then each at its best in fp32 and
#                            in bf16 (compile + channels_last), 6 compiles in all
# about 9 minutes in all, with the environment and the summary. Other phases, by name or with "all"
# (no budget then; each phase keeps its own limit; over 10 minutes together): op-tests [130],
# sampler-tests [100], op-bench [150], sampler-bench [SAMPLER_BENCH_LIMIT, 300], diffusers-128
# (~100 s [150]: the diffusers section's 128 px case, batch 16, 100 steps), sharded-sampling (2 GPUs).
# A dry run of the new phases' scripts on a CPU (tiny sizes, no build, no CUDA graphs):
#     GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh fast-256,latency-1,train,diffusers
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
DEFAULT_PHASES=build,new-tests,fast-256,latency-1,train,diffusers
ALL_PHASES=build,op-tests,sampler-tests,op-bench,sampler-bench,sharded-sampling,fast-256,latency-1,train,diffusers
ALL_PHASES+=,diffusers-128
case ${1:-default} in
  default) WHAT=$DEFAULT_PHASES; BUDGET=${GPU_CHECK_BUDGET:-570} ;;
  all) WHAT=$ALL_PHASES; BUDGET=${GPU_CHECK_BUDGET:-100000} ;;
  *) WHAT=$1; BUDGET=${GPU_CHECK_BUDGET:-100000} ;;
esac
for name in ${WHAT//,/ }; do
  if [[ ",$ALL_PHASES,new-tests," != *",$name,"* ]]; then
    echo "gpu_check: unknown phase '$name'; expected default, all or some of $ALL_PHASES,new-tests" >&2
    exit 2
  fi
done
DEVICE=${GPU_CHECK_DEVICE:-cuda}
TINY=${GPU_CHECK_TINY:-}
# phases append to their files: a results folder from an earlier run is moved aside, not mixed in
if [[ -d $OUT && -n $(ls -A "$OUT") ]]; then
  mv "$OUT" "$OUT.$(date +%Y%m%d-%H%M%S)" && echo "gpu_check: the earlier $OUT moved aside"
fi
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
step() { echo "== $1 ($(date +%T))"; }
has() { [[ " ${WHAT//,/ } " == *" $1 "* ]]; }
printf '| phase | limit | time | exit status |\n|---|---:|---:|---|\n' >"$OUT/phases.md"
# run_phase NAME LIMIT LOG CMD...: CMD under LIMIT seconds or what is left of the budget, whichever is
# smaller (skipped under 10 s); its output to LOG and the console; a row in phases.md
run_phase() {
  local name=$1 limit=$2 log=$3 start rc left
  shift 3
  step "$name"
  start=$(date +%s)
  left=$(( BUDGET - (start - T0) - 15 ))
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then
    echo "$name: skipped, the time budget is spent" | tee -a "$log"
    rc=skipped
  else
    timeout "$limit" "$@" 2>&1 | grep --line-buffered -v "^DEBUG" | tee -a "$log"
    rc=${PIPESTATUS[0]}
    (( rc == 124 )) && rc="124 (cut at its limit)"
  fi
  [[ $rc == skipped ]] && limit=- || limit="$limit s"
  printf '| %s | %s | %s s | %s |\n' "$name" "$limit" "$(( $(date +%s) - start ))" "$rc" >>"$OUT/phases.md"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

if has build; then
  export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
  export FASTDDPM_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} FASTDDPM_CUDA_ARCHS=${FASTDDPM_CUDA_ARCHS:-90}
  run_phase build 150 "$OUT/build.log" "$PY" setup.py build_ext --inplace >/dev/null  # the log only
  { grep '^| build ' "$OUT/phases.md"; tail -n 15 "$OUT/build.log"; } >"$OUT/build.txt"
  head -n 1 "$OUT/build.txt"
fi
"$PY" -c "from fastddpm import ops; print('native:', ops.native_status()); print('triton:', ops.triton_status())" 2>&1 \
  | tee -a "$OUT/build.txt"

if has op-tests; then
  # every hypothesis shape would be autotuned afresh: the tests take each space's first config
  FASTDDPM_TRITON_AUTOTUNE=0 run_phase op-tests 130 "$OUT/tests_ops.txt" "$PY" -m pytest -q -p no:cacheprovider \
    --hypothesis-seed=0 tests/test_cuda_ops.py tests/test_triton_ops.py ${OP_TESTS_K:+-k "$OP_TESTS_K"} \
    -p no:logging -rf --tb=short
fi
if has sampler-tests; then
  run_phase sampler-tests 100 "$OUT/tests_sampler.txt" "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_sampler_gpu.py -p no:logging -rf --tb=short
elif has new-tests; then
  run_phase new-tests 60 "$OUT/tests_new.txt" "$PY" -m pytest -q -p no:cacheprovider tests/test_sampler_gpu.py \
    -k per_image_seeds -p no:logging -rf --tb=short
fi
if has op-bench; then
  run_phase op-bench 150 "$OUT/bench_ops.txt" "$PY" -m benchmarks --device cuda --only ops --rounds 3 --out "$OUT/ops"
fi
if has sampler-bench; then
  run_phase sampler-bench "${SAMPLER_BENCH_LIMIT:-300}" "$OUT/bench_sampler.txt" \
    "$PY" -m benchmarks --device cuda --only sampler --out "$OUT/sampler"
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

TINY_FLAG=${TINY:+--tiny}
if has fast-256; then
  # default mode first (graphs of 20 steps reuse its compiled model); max-autotune, whose autotuning
  # takes longest and is least predictable, in a process of its own with its own limit
  run_phase "fast-256 (default mode)" 130 "$OUT/fast-256.txt" "$PY" -m benchmarks.gpu_fast fast-256 \
    --device "$DEVICE" $TINY_FLAG --variants default:1,default:20 --out "$OUT"
  run_phase "fast-256 (max-autotune)" 150 "$OUT/fast-256.txt" "$PY" -m benchmarks.gpu_fast fast-256 \
    --device "$DEVICE" $TINY_FLAG --variants max-autotune:1 --no-eager-forward --out "$OUT"
fi
if has latency-1; then
  run_phase latency-1 75 "$OUT/latency-1.txt" "$PY" -m benchmarks.gpu_fast latency-1 --device "$DEVICE" $TINY_FLAG \
    --out "$OUT"
fi
if has train; then
  run_phase train 90 "$OUT/train.txt" "$PY" -m benchmarks --device "$DEVICE" --only train ${TINY:+--quick} \
    --out "$OUT/train"
  if [[ -f $OUT/train/bench.md ]]; then
    { echo "## train: one training step, the reference ops eager against torch.compile"; echo
      grep '^|' "$OUT/train/bench.md"; } >"$OUT/train.md"
  fi
fi
# the suite's diffusers cases, one process each, with 2 whole calls a setting (the section's own run
# makes 10); diffusers.md is written from the rows the runs printed, those of a run cut short too
diffusers_case() {
  run_phase "$1 ($2)" "$3" "$OUT/diffusers.txt" "$PY" -m benchmarks.gpu_diffusers --case "$2" --device "$DEVICE" \
    "${@:4}"
  "$PY" -m benchmarks.gpu_diffusers --from-log "$OUT/diffusers.txt" --out "$OUT"
}
if has diffusers; then
  if [[ -n $TINY ]]; then
    diffusers_case diffusers "quick config" 150
  else
    diffusers_case diffusers ddpm-cifar10-32 150 --steps 200
  fi
fi
if has diffusers-128; then
  diffusers_case diffusers-128 "train_unconditional 128 px" 150
fi

step summary
{
  echo "# GPU check, $(date -u '+%F %H:%M') UTC: $WHAT"
  echo
  sed 's/^/    /' "$OUT/env.txt"
  echo
  cat "$OUT/phases.md"
  echo
  grep -h -E '^(native|triton):' "$OUT/build.txt" 2>/dev/null | sed 's/^/- /'
  for log in tests_new tests_ops tests_sampler; do
    [[ -f $OUT/$log.txt ]] && echo "- $log: $(grep -E '(passed|failed|error|skipped|deselected)' "$OUT/$log.txt" \
      | tail -n 1)"
  done
  for part in fast-256 latency-1 train diffusers; do
    [[ -f $OUT/$part.md ]] && { echo; cat "$OUT/$part.md"; }
  done
} >"$OUT/summary.md"
cat "$OUT/summary.md"
step done

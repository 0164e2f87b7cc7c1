#!/usr/bin/env bash
# One-shot GPU check: install the carried wheels, build the package against the machine's torch
# (CUDA kernels for sm_90), run the GPU benchmarks and the GPU tests, and print a short table.
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#
# Robust by design: every step runs even if an earlier one failed, each under its own time limit,
# and all limits together stay inside GPU_CHECK_BUDGET seconds (default 230, with room over the
# H200 run's time: bench/RESULTS.md, "Measurements moved out of code comments"). Everything goes to
# $OUT (default out/gpu_check): gpu_check.log (all output), steps.tsv, bench.json, pytest.txt,
# summary.txt. Knobs (environment): BENCH_ARGS (extra args of `python -m bench.gpu_bench`, e.g.
# "--rows 20000"), ONLY (comma-separated step names to run), EXTRACT_ARGS (args of
# `python -m bench.extract` after the fixed ones; default
# "--rows 1024 --batch-size 64 --rss-rows="), PYTHON, GPU_CHECK_BUDGET, BENCH_LIMIT (seconds of the
# Triton bench step, default 130; the bench saves its JSON after every variant, so a cut-off run
# keeps what it measured), WGRAM_LIMIT (the weighted Gram bench step, default 90).
#
# Before the run, on the machine with network access, fill the git-ignored .whl/ (carried):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 gguf==0.19.0 airports-py==3.1.0
#   cp ../shared/datasets/paper/world_place.csv .whl/
# then run it with .whl carried and a limit that leaves room: the script itself stays inside
# GPU_CHECK_BUDGET (230 s) plus the build's first-time overheads.
#
# The full Gram section now times ~35 kernel variants (each compiled once, a few seconds), more
# than the default budget holds. With 15 device minutes, measure in two calls on one warm machine
# (the build stays between calls):
#   1. ONLY=bench BENCH_ARGS="--sections ceilings,gram,fit --no-old-modes" BENCH_LIMIT=400 \
#      GPU_CHECK_BUDGET=540 bash bench/gpu_check.sh   # the 60 % target (preshift vs rawtma), whole fit
#   2. ONLY=bench_cuda,tests_triton,tests_cuda,extract BENCH_ARGS="--sections ceilings,neurons" \
#      GPU_CHECK_BUDGET=400 bash bench/gpu_check.sh        # tests, CUDA kernels, extraction
# The weighted Gram (Newton Hessians of the classification probes) has its own two steps:
#   3. ONLY=bench_wgram,tests_wgram,classify_cuda GPU_CHECK_BUDGET=300 bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/out/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
STEPS="$OUT/steps.tsv"
: > "$LOG"
: > "$STEPS"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-230}
BENCH_ARGS=${BENCH_ARGS:-}
ONLY=${ONLY:-}   # e.g. ONLY=bench,tests_triton: run just these steps (env, wheels, build, import always)
EXTRACT_ARGS=${EXTRACT_ARGS:-}
export PYTHONUNBUFFERED=1
T0=$(date +%s)

step() {  # step NAME LIMIT_S CMD...  (never fails; records rc and seconds)
  local name=$1 limit=$2
  shift 2
  if [[ -n $ONLY && ! ,$ONLY,env,wheels,build,build_cpu_only,import, == *,$name,* ]]; then
    return 0                                   # not selected by ONLY
  fi
  local left=$(( BUDGET - ($(date +%s) - T0) - 10 ))
  if (( left < 15 )); then
    echo "##### [$name] skipped: time budget spent" | tee -a "$LOG"
    printf '%s\t%s\t%s\n' "$name" "skipped" 0 >> "$STEPS"
    return 0
  fi
  (( limit > left )) && limit=$left
  local t=$(date +%s) tmp="/tmp/gpu_check_$name.log"
  echo "##### [$name] $(date -u +%T) limit ${limit}s: $*" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" > "$tmp" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t ))
  cat "$tmp" >> "$LOG"
  echo "##### [$name] rc=$rc in ${dt}s" | tee -a "$LOG"
  if (( rc != 0 )); then  # show the end of a failed step right away
    tail -n 25 "$tmp" | sed "s/^/  [$name] /"
  fi
  printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >> "$STEPS"
  return 0
}

# ---------------------------------------------------------------------------------------- env
step env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv;
  $PY -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())';
  nvcc --version | tail -n 2; nproc; free -g | head -n 2;
  $PY -m pip list 2>/dev/null | grep -i -E '^(scikit-build-core|pybind11|cmake|ninja|cupy|numpy|scipy) '"

# ------------------------------------------------------------------------- carried wheels
# zarr and its needs are not on the image; .whl is carried by the caller (git-ignored).
if ls .whl/*.whl > /dev/null 2>&1; then
  step wheels 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "##### [wheels] no .whl/ carried: zarr-dependent code will not import" | tee -a "$LOG"
  printf '%s\t%s\t%s\n' wheels "missing" 0 >> "$STEPS"
fi

# ---------------------------------------------------------------------------------------- build
# Editable, like `make native`: tests and benches run from the repo root and import the
# compiled modules from build/. Only sm_90 to keep the compile short.
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
step build 170 env ACTSTORE_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" \
     $PY -m pip install --no-build-isolation --no-deps -e .
if ! $PY -c "import actstore._native, probes._C" > /dev/null 2>&1; then
  step build_cpu_only 120 env ACTSTORE_CUDA=OFF $PY -m pip install --no-build-isolation --no-deps -e .
fi
step import 30 $PY -c "
from actstore import _native; print('actstore._native (fp16 scan):', _native.__file__, 'openmp', _native.openmp)
from probes import _C; print('probes._C (cpu kernels):', _C.__file__, 'openmp', _C.openmp)
from probes.kernels import cuda
print('probes._C_cuda:', cuda._ext and cuda._ext.__file__, 'devices', cuda._ext and cuda._ext.device_count())
from probes.kernels import available_backends; print('backends:', available_backends())
import zarr; print('zarr', zarr.__version__)
"

# ---------------------------------------------------------------------------------------- bench
# Triton variants, the whole fit and the ceilings first; the CUDA C++ variants in a second
# process merged into the same JSON (a crash there cannot take the Triton numbers with it)
step bench ${BENCH_LIMIT:-130} $PY -m bench.gpu_bench --json "$OUT/bench.json" --backends triton $BENCH_ARGS
step bench_cuda 50 $PY -m bench.gpu_bench --json "$OUT/bench.json" --merge --backends cuda \
     --sections gram,neurons $BENCH_ARGS
# the weighted Gram (Newton/IRLS Hessians): Triton tilings, CUDA, a torch fp16 peer and the
# unweighted Gram on 32x4000x4096 and 30x20000x576, M=5 weight sets (WGRAM_LIMIT seconds)
step bench_wgram ${WGRAM_LIMIT:-90} $PY -m bench.gpu_bench --json "$OUT/bench.json" --merge \
     $BENCH_ARGS --sections wgram --backends triton,cuda
# the logistic probes' whole C search (select_c, float32) on the GPU, 4 Llama-shaped layers
# scaled to 32, next to its floor on the same GPU; no scikit-learn (issue 15's GPU row)
step classify_cuda 90 $PY -m bench.probe --task classify --shape llama7b --our-layers 4 \
     --sk-layers 0 --device cuda --no-write

# ---------------------------------------------------------------------------------------- tests
step tests_triton 90 $PY -m pytest -q -rs -p no:cacheprovider \
     tests/probes/test_kernels_triton.py tests/probes/test_stream.py tests/probes/test_neurons.py
step tests_cuda 45 $PY -m pytest -q -rs -p no:cacheprovider tests/probes/test_kernels_cuda.py
step tests_wgram 90 $PY -m pytest -q -rs -p no:cacheprovider tests/probes/test_kernels_weighted_gram.py
cat /tmp/gpu_check_tests_triton.log /tmp/gpu_check_tests_cuda.log /tmp/gpu_check_tests_wgram.log \
    > "$OUT/pytest.txt" 2>/dev/null

# extraction benchmark (bench.extract, the extract engineer's): a random-init Llama-2-7B shape
# on the GPU; the paper CSV is carried in .whl/ (../shared does not travel)
DATA=.whl/world_place.csv
[[ -f $DATA ]] || DATA=../shared/datasets/paper/world_place.csv
if [[ -f bench/extract.py ]]; then
  step extract 60 $PY -m bench.extract --device cuda --model-config llama2-7b --random-init \
       --dataset "$DATA" --tmp /tmp --no-results ${EXTRACT_ARGS:---rows 2048 --batch-size 64 --rss-rows= --timing-only}
else
  printf '%s\t%s\t%s\n' extract "absent" 0 >> "$STEPS"
fi

step tests_gpu_marked 45 $PY -m pytest -q -rs -p no:cacheprovider -m gpu --continue-on-collection-errors \
     tests --ignore=tests/probes/test_kernels_cuda.py --ignore=tests/probes/test_kernels_triton.py \
     --ignore=tests/probes/test_kernels_weighted_gram.py \
     --ignore=tests/probes/test_neurons.py --ignore=tests/probes/test_stream.py
cat /tmp/gpu_check_tests_gpu_marked.log >> "$OUT/pytest.txt" 2>/dev/null

# ---------------------------------------------------------------------------------------- table
{
  echo "==================== gpu_check summary ($(date -u '+%F %T') UTC, $(( $(date +%s) - T0 )) s)"
  printf '%-18s %-8s %s\n' step rc seconds
  while IFS=$'\t' read -r n rc s; do printf '%-18s %-8s %s\n' "$n" "$rc" "$s"; done < "$STEPS"
  for t in tests_triton tests_cuda tests_wgram tests_gpu_marked; do
    [[ -f /tmp/gpu_check_$t.log ]] && echo "$t: $(grep -E '(passed|failed|error)' /tmp/gpu_check_$t.log | tail -n 1)"
  done
  if [[ -f "$OUT/bench.json" ]]; then
    $PY -m bench.gpu_bench --table-only --json "$OUT/bench.json" 2>&1
  else
    echo "no bench.json (bench step failed before its first section finished)"
  fi
} | tee "$OUT/summary.txt"

#!/usr/bin/env bash
# The device check: one call of about 8.5 minutes on a fresh CUDA machine (the workplace's
# H100/H200 image: torch 2.11 + CUDA 13, triton 3.6, Python 3.12, ninja, compute-sanitizer;
# no network), inside a 15-minute lease that also pays for the machine's start.
#
#   benchmarks/gpu_check.sh OUT_DIR                   # on the GPU machine
#   DRY_RUN=1 benchmarks/gpu_check.sh OUT_DIR         # the same logic on the CPU, tiny shapes
#   STAGES="kernel step" benchmarks/gpu_check.sh OUT  # some stages (the build already installed)
#
# Stages, most valuable first, each under its own limit (seconds; env overrides):
#   preflight PREFLIGHT_S=15  versions, nvcc, Python.h, ninja (installed from build/wheelhouse
#                             when missing), compute-sanitizer; stops the run if the build cannot work
#   build     BUILD_S=150     pip install --no-build-isolation: ninja, MAX_JOBS=16, sm_90 only
#   smoke     SMOKE_S=45      every op on every backend against the reference, once
#   kernel    KERNEL_S=90     the kernels alone: L2 flushed, a copy of the same bytes interleaved
#   step      STEP_S=75       the DPS step vs eager, by hand and by hand compiled (bounded); SupCon
#   tests     TEST_S=50       a reduced test matrix: the GPU cases in float32, on xdist workers
#   memcheck  MEMCHECK_S=40   compute-sanitizer memcheck over a short workload
#   racecheck RACECHECK_S=45  compute-sanitizer racecheck over the shared-memory kernels
# The limits sum to 510 s; the script refuses a plan over 540 s (9 minutes).
#
# OUT_DIR gets at most 8 files (what the device machine sends back): results.jsonl (one JSON
# object per line, written as it comes: the plan, every measurement, every stage's status
# ok / failed / timeout / skipped, so a killed run still returns what it measured), check.log,
# build.log, bench.log, tests.log, tests.xml, sanitize.log.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PY=${PYTHON:-python3} REPO OUT RESULTS="$OUT/results.jsonl" PYTHONUNBUFFERED=1
export DRY_RUN=${DRY_RUN:-0}
if [ "$DRY_RUN" = 1 ]; then export TRITON_INTERPRET=${TRITON_INTERPRET:-1}; else export TRITON_INTERPRET=0; fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$(dirname "$(command -v "$PY")"):$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824

STAGE_NAMES=(preflight build smoke kernel step tests memcheck racecheck)
declare -A LIMIT=([preflight]=${PREFLIGHT_S:-15} [build]=${BUILD_S:-150} [smoke]=${SMOKE_S:-45}
  [kernel]=${KERNEL_S:-90} [step]=${STEP_S:-75} [tests]=${TEST_S:-50} [memcheck]=${MEMCHECK_S:-40}
  [racecheck]=${RACECHECK_S:-45})
MAX_TOTAL_S=540
STAGES=${STAGES:-${STAGE_NAMES[*]}}
# the reduced matrix: GPU cases only, float32 (16-bit cases multiply the Triton specialisations:
# about 720 in one file did not fit the old check's 150 s)
TEST_K=${TEST_K:-cuda and not float16 and not bf16 and not fp16}
t0=$(date +%s)
status=0
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/check.log"; }
json_line() { printf '%s\n' "$1" >> "$RESULTS"; }
stage_record() {  # name status limit elapsed rc reason
  json_line "$(printf '{"stage": "%s", "kind": "stage", "status": "%s", "limit_s": %d, "elapsed_s": %d, "rc": %d, "reason": "%s"}' "$@")"
}

plan_total=0; plan_json=""
for s in "${STAGE_NAMES[@]}"; do
  plan_total=$(( plan_total + LIMIT[$s] )); plan_json+="\"$s\": ${LIMIT[$s]}, "
done
json_line "{\"kind\": \"plan\", \"limits_s\": {${plan_json%, }}, \"total_s\": $plan_total, \"max_total_s\": $MAX_TOTAL_S, \"dry_run\": $([ "$DRY_RUN" = 1 ] && echo true || echo false), \"stages\": \"$STAGES\"}"
if [ "$plan_total" -gt "$MAX_TOTAL_S" ]; then
  stamp "stage limits sum to $plan_total s, over the $MAX_TOTAL_S s the device call allows: refused"
  exit 2
fi
stamp "plan: $plan_total s over ${STAGE_NAMES[*]} (running: $STAGES); dry run: $DRY_RUN"

wanted() { [[ " $STAGES " == *" $1 "* ]]; }

run_stage() {  # name log function: the function under the stage's limit, one JSON line for the stage
  local name=$1 log=$2 fn=$3 limit=${LIMIT[$1]}
  if ! wanted "$name"; then stage_record "$name" skipped "$limit" 0 0 "not in STAGES"; return 0; fi
  stamp "$name (limit $limit s)"
  local t=$(date +%s)
  echo "=== $name" >> "$log"
  timeout -k 5 "$limit" bash -c "$fn" >> "$log" 2>&1
  local rc=$? el=$(( $(date +%s) - t )) st=ok why=""
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st=timeout; why="killed at its limit of $limit s"
  elif [ $rc -eq 75 ]; then st=skipped; why=$(tail -1 "$log" | tr -d '"\\' | cut -c1-200)
  elif [ $rc -ne 0 ]; then st=failed; why=$(tail -1 "$log" | tr -d '"\\' | cut -c1-200); fi
  stage_record "$name" "$st" "$limit" "$el" "$rc" "$why"
  stamp "$name: $st after $el s${why:+ ($why)}"
  if [ $st = failed ] || [ $st = timeout ]; then status=1; fi
  return $rc
}
skip() { echo "skipped: $*"; exit 75; }  # exit 75: the stage records itself as skipped

install_missing() {  # build/test tools an offline image may lack, from a carried wheelhouse
  local need=($($PY -c 'import importlib.util as u
print(*[m for m in ("setuptools", "wheel", "pytest", "xdist", "ninja") if u.find_spec(m) is None])'))
  [ ${#need[@]} -eq 0 ] && return 0
  need=("${need[@]/xdist/pytest-xdist}")
  if [ "$DRY_RUN" != 1 ] && [ -d "$REPO/build/wheelhouse" ]; then
    echo "installing ${need[*]} from build/wheelhouse"
    $PY -m pip install -q --no-index --find-links "$REPO/build/wheelhouse" "${need[@]}" 2>&1 | tail -3
  else
    echo "missing ${need[*]}; no build/wheelhouse used (make gpu-wheelhouse, then carry build/wheelhouse)"
  fi
}
preflight() { install_missing; cd "$OUT" && $PY "$REPO/benchmarks/gpu_smoke.py" preflight --out "$RESULTS"; }
build() {
  [ "$DRY_RUN" = 1 ] && skip "dry run: the installed package is used"
  set -o pipefail
  cd "$REPO" && $PY -m pip install --no-build-isolation --no-deps --no-cache-dir -v . 2>&1 | grep -vE '^\s*$' \
    | tail -60
}
smoke() { cd "$OUT" && $PY "$REPO/benchmarks/gpu_smoke.py" smoke --out "$RESULTS"; }
kernel() {
  cd "$OUT" && $PY "$REPO/benchmarks/gpu_bench.py" kernel --out "$RESULTS" --budget-s $(( LIMIT_kernel - 15 ))
}
step() { cd "$OUT" && $PY "$REPO/benchmarks/gpu_bench.py" step --out "$RESULTS" --budget-s $(( LIMIT_step - 20 )); }
tests() {
  local files=("$REPO"/tests/test_{supcon,soft_cross_entropy,dps_cross_entropy,validation,registration}.py) extra=()
  $PY -c "import xdist" 2>/dev/null && extra+=(-n 8)
  [ "$DRY_RUN" = 1 ] && extra=(--collect-only)  # the selection and the imports, no GPU to test on
  cd "$OUT" && $PY -m pytest "${extra[@]}" -q --maxfail=20 -p no:cacheprovider -o addopts="" \
    --import-mode=importlib -k "$TEST_K" --junitxml="$OUT/tests.xml" "${files[@]}"
  local rc=$?
  [ "$DRY_RUN" = 1 ] && [ $rc -eq 5 ] && return 0  # no GPU case is collected on the CPU
  return $rc
}
sanitizer() {  # tool
  [ "$DRY_RUN" = 1 ] && skip "no CUDA (dry run): compute-sanitizer needs a GPU"
  command -v compute-sanitizer >/dev/null || skip "compute-sanitizer not found"
  cd "$OUT" && compute-sanitizer --tool "$1" --error-exitcode 3 $PY "$REPO/benchmarks/gpu_smoke.py" workload "$1"
}
memcheck() { sanitizer memcheck; }
racecheck() { sanitizer racecheck; }
export LIMIT_kernel=${LIMIT[kernel]} LIMIT_step=${LIMIT[step]} TEST_K
export -f skip install_missing preflight build smoke kernel step tests sanitizer memcheck racecheck

run_stage preflight "$OUT/bench.log" preflight \
  || { [ "$DRY_RUN" = 1 ] || { stamp "preflight failed: nothing else can work"; tail -3 "$OUT/bench.log"; exit 1; }; }
run_stage build "$OUT/build.log" build || tail -30 "$OUT/build.log"
run_stage smoke "$OUT/bench.log" smoke
run_stage kernel "$OUT/bench.log" kernel
run_stage step "$OUT/bench.log" step
run_stage tests "$OUT/tests.log" tests; tail -3 "$OUT/tests.log"
run_stage memcheck "$OUT/sanitize.log" memcheck
run_stage racecheck "$OUT/sanitize.log" racecheck

stamp "done, status $status"
$PY "$REPO/benchmarks/gpu_summary.py" "$RESULTS" | tee -a "$OUT/check.log"
exit $status

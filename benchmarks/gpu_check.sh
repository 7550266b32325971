#!/usr/bin/env bash
# GPU check for a fresh CUDA machine (H200 image: torch 2.11 + CUDA 13, triton 3.6,
# Python 3.12, no network). One run of about 6-8 minutes:
#   benchmarks/gpu_check.sh OUT_DIR
# builds the extension with its CUDA kernels, runs the GPU tests (Triton and CUDA
# backends against the reference), the GPU benchmarks (JSON written after every row,
# most important shapes first, within a time budget), and compute-sanitizer over short
# workloads when present: memcheck, then racecheck of the kernels that use shared memory.
# Everything lands in OUT_DIR.
#
# Offline machine without pytest/setuptools? On the CPU machine run `make gpu-wheelhouse`
# and carry build/wheelhouse with the run; this script installs from it when needed.
# Time limits (seconds, env): BUILD_S=240 TEST_S=150 BENCH_S=150 MEMCHECK_S=60 RACECHECK_S=90.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TRITON_INTERPRET=0
export MAX_JOBS=${MAX_JOBS:-16}
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824
BUILD_S=${BUILD_S:-240}; TEST_S=${TEST_S:-150}; BENCH_S=${BENCH_S:-150}; MEMCHECK_S=${MEMCHECK_S:-60}
RACECHECK_S=${RACECHECK_S:-90}
status=0
t0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

$PY - <<'PYEOF' | tee "$OUT/env.txt"
import torch, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton none")
PYEOF

# build/test tools an offline image may lack: install them from a carried wheelhouse
need=()
for mod in setuptools wheel pytest; do $PY -c "import $mod" 2>/dev/null || need+=("$mod"); done
$PY -c "import xdist" 2>/dev/null || need+=("pytest-xdist")
if [ ${#need[@]} -gt 0 ]; then
  if [ -d "$REPO/build/wheelhouse" ]; then
    stamp "installing ${need[*]} from build/wheelhouse"
    $PY -m pip install -q --no-index --find-links "$REPO/build/wheelhouse" "${need[@]}" 2>&1 | tail -3
  else
    stamp "missing ${need[*]} and no build/wheelhouse (make gpu-wheelhouse, then carry it)"
  fi
fi

stamp "build"
( cd "$REPO" && timeout "$BUILD_S" $PY -m pip install --no-build-isolation --no-deps . ) > "$OUT/build.log" 2>&1 \
  || { stamp "BUILD FAILED"; tail -40 "$OUT/build.log"; status=1; }
( cd /tmp && $PY -c "import dps_fast; print('backends on cuda:', dps_fast.available_backends('cuda'))" ) | tee -a "$OUT/env.txt"

stamp "tests (GPU cases)"
# only the kernel test files: they need torch + pytest and nothing else (no sklearn etc.)
par=""; $PY -c "import xdist" 2>/dev/null && par="-n 8"
( cd /tmp && timeout -s INT "$TEST_S" $PY -m pytest $par -q --maxfail=20 -p no:cacheprovider -o addopts="" \
    --import-mode=importlib -k "cuda" --junitxml="$OUT/tests.xml" \
    "$REPO"/tests/test_{dps_cross_entropy,soft_cross_entropy,supcon,validation,registration}.py ) > "$OUT/tests.log" 2>&1
rc=$?; tail -5 "$OUT/tests.log"; [ $rc -eq 0 ] || status=1

stamp "benchmarks"
( cd /tmp && timeout $(( BENCH_S + 60 )) $PY "$REPO/benchmarks/gpu_bench.py" --out "$OUT/gpu-bench.json" \
    --budget-s "$BENCH_S" ) > "$OUT/bench.log" 2>&1
rc=$?; tail -20 "$OUT/bench.log"; [ $rc -eq 0 ] || status=1

if command -v compute-sanitizer >/dev/null 2>&1; then
  stamp "compute-sanitizer memcheck"
  ( cd /tmp && timeout "$MEMCHECK_S" compute-sanitizer --tool memcheck --error-exitcode 3 $PY - ) > "$OUT/memcheck.log" 2>&1 <<'PYEOF'
import torch, dps_fast
for be in dps_fast.available_backends("cuda"):
    if be == "reference":
        continue
    for c in (1, 10, 1000, 5000):
        a = dps_fast.init_prior(torch.randint(0, c, (64,), device="cuda"), c)
        z = torch.randn(2, 17, c, device="cuda", requires_grad=True)
        dps_fast.dps_cross_entropy(z, torch.randperm(64, device="cuda")[:17], a, backend=be).backward()
        dps_fast.soft_cross_entropy(z[0], torch.softmax(z[1].detach(), -1), backend=be).backward()
    f = torch.randn(2, 33, 24, device="cuda", requires_grad=True)
    dps_fast.supcon_loss(f, backend=be).backward()
    torch.cuda.synchronize()
print("memcheck workload done")
PYEOF
  rc=$?; tail -3 "$OUT/memcheck.log"; [ $rc -eq 0 ] || status=1
  stamp "compute-sanitizer racecheck (shared-memory kernels)"
  # The CUDA DPS / soft-CE kernel reduces through shared memory when TPR = 256 (C > 2048), and for
  # every TPR in the mean / sum finish (block partials, the last block's sum); the SupCon stats and
  # gradient kernels stage 16 x 128 feature tiles (D = 24: one chunk, D = 200: two) and the G tile.
  # The Triton kernels (tl.dot, reductions) run the same workload. Small shapes: racecheck tracks
  # every shared-memory access.
  ( cd /tmp && timeout "$RACECHECK_S" compute-sanitizer --tool racecheck --error-exitcode 3 $PY - ) \
    > "$OUT/racecheck.log" 2>&1 <<'PYEOF'
import torch, dps_fast
dev = "cuda"
for be in [b for b in dps_fast.available_backends(dev) if b != "reference"]:
    for c, red in ((5000, "mean"), (2500, "none"), (1000, "sum"), (10, "mean")):
        for v in (1, 2):
            a = dps_fast.init_prior(torch.randint(0, c, (100,), device=dev), c, dtype=torch.bfloat16)
            z = torch.randn(v, 37, c, device=dev, requires_grad=True)
            loss = dps_fast.dps_cross_entropy(z, torch.randperm(100, device=dev)[:37], a, tau_e=0.5 * v,
                                              reduction=red, backend=be)
            loss.sum().backward()
        z = torch.randn(37, c, device=dev, requires_grad=True)
        t = torch.softmax(torch.randn(37, c, device=dev), -1)
        dps_fast.soft_cross_entropy(z, t, reduction=red, backend=be).sum().backward()
    for d in (24, 200):
        f = torch.randn(2, 37, d, device=dev, requires_grad=True)
        dps_fast.supcon_loss(f, backend=be).backward()
        dps_fast.supcon_loss(f, labels=torch.randint(0, 5, (37,), device=dev), backend=be).backward()
        dps_fast.supcon_loss(f, soft_targets=torch.rand(37, 6, device=dev), tau=0.5, backend=be).backward()
    torch.cuda.synchronize()
print("racecheck workload done")
PYEOF
  rc=$?; tail -3 "$OUT/racecheck.log"; [ $rc -eq 0 ] || status=1
else
  stamp "compute-sanitizer not found; memcheck and racecheck skipped" | tee "$OUT/memcheck.log" "$OUT/racecheck.log"
fi
stamp "done, status $status"
exit $status

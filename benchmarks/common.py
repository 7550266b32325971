"""Shared pieces of the CPU benchmarks: providers, byte models, copy bandwidth, environment."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

import torch

import dps_fast
from dps_fast import reference as R
from dps_fast.ops import dps_cross_entropy as dps_cross_entropy_op
from dps_fast.ops import soft_cross_entropy as soft_cross_entropy_op
from dps_fast.ops import supcon as supcon_op

PROVIDERS = ("eager", "compile", "fused")
# The DPS step also against the step as one would write it by hand (dps_by_hand).
DPS_PROVIDERS = ("eager", "compile", "hand", "hand_compile", "fused")

_compiled = {}


def compiled(fn):
    """torch.compile(fn), compiled once per process (outside timing: the benchmarks warm it up)."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def dps_by_hand(logits, index, alpha, gamma=0.95):
    """The DPS step (docs/method.md §2; one view, tau_e = 1, posterior target, mean
    reduction) as one would write it by hand in PyTorch: softmax, index_select /
    index_copy_, soft-target cross-entropy. None of the library's policies (no
    validation, no non-finite guard, maths in the logits' dtype)."""
    with torch.no_grad():
        evidence = torch.softmax(logits, -1)
        rows = alpha.index_select(0, index).to(evidence.dtype) * gamma + evidence
        alpha.index_copy_(0, index, rows.to(alpha.dtype))
        target = rows / rows.sum(-1, keepdim=True)
    return torch.nn.functional.cross_entropy(logits, target)


def dps_fn(provider):
    if provider == "eager":
        return R.dps_cross_entropy
    if provider == "compile":
        return compiled(R.dps_cross_entropy)
    if provider == "hand":
        return dps_by_hand
    if provider == "hand_compile":
        return compiled(dps_by_hand)
    return lambda z, idx, a: dps_fast.dps_cross_entropy(z, idx, a, backend="cpu")


def soft_ce_fn(provider):
    if provider == "eager":
        return R.soft_cross_entropy
    if provider == "compile":
        return compiled(R.soft_cross_entropy)
    return lambda z, t: dps_fast.soft_cross_entropy(z, t, backend="cpu")


def supcon_fn(provider):
    if provider == "eager":
        return R.supcon_loss
    if provider == "compile":
        return compiled(R.supcon_loss)
    return lambda f, labels: dps_fast.supcon_loss(f, labels, backend="cpu")


# The byte models are the ops' own declarations (dps_fast/ops/<op>.py::bytes_moved).
dps_bytes = dps_cross_entropy_op.bytes_moved
soft_ce_bytes = soft_cross_entropy_op.bytes_moved
supcon_bytes = supcon_op.bytes_moved


def copy_bandwidth(nbytes=256 * 2 ** 20, reps=15):
    """Median GB/s of dst.copy_(src) for two nbytes buffers (bytes moved = 2 * nbytes,
    the same convention as the byte models: torch's copy stores with ordinary stores,
    so it also reads the destination lines)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return 2 * nbytes / ts[len(ts) // 2] / 1e9


def environment():
    return {
        "torch": torch.__version__,
        "dps_fast": dps_fast.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


_PEAK_SCRIPT = r"""
import sys, torch, dps_fast
sys.path.insert(0, {bench_dir!r})
from common import supcon_fn
provider, m, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

torch.manual_seed(0)
f = torch.randn(2, m // 2, d)
labels = torch.randint(0, 100, (m // 2,))
fn = supcon_fn(provider)
x = f.clone().requires_grad_(True)
if provider == "compile":
    fn(x, labels).backward()          # compile outside the measurement
    x.grad = None
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:  # reset the high-water mark to the current RSS
    fh.write("5")
loss = fn(x, labels)
loss.backward()
print(status("VmHWM") - base)
"""


def supcon_peak_extra_bytes(provider, m, d):
    """Peak resident memory added by one SupCon fwd+bwd, measured in a fresh process:
    the RSS high-water mark (VmHWM, reset through /proc/self/clear_refs once the
    inputs exist) minus the RSS at that point. (ru_maxrss would not do: Linux
    carries it over from the forking parent.)"""
    code = _PEAK_SCRIPT.format(bench_dir=os.path.dirname(os.path.abspath(__file__)))
    here = os.path.dirname(os.path.abspath(__file__))  # not the repo root: import the installed package
    out = subprocess.run([sys.executable, "-c", code, provider, str(m), str(d)], capture_output=True,
                         text=True, env=os.environ.copy(), cwd=here)
    if out.returncode:
        raise RuntimeError(f"peak-memory probe failed for {provider} M={m}:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])

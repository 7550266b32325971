"""The device check's short stages (benchmarks/gpu_check.sh):

    python benchmarks/gpu_smoke.py preflight --out results.jsonl   # versions, compiler, headers, tools
    python benchmarks/gpu_smoke.py smoke --out results.jsonl       # every op on every backend, once
    python benchmarks/gpu_smoke.py workload memcheck|racecheck     # what compute-sanitizer runs

smoke runs each op on each backend on small inputs against the reference (loose bounds: it
finds a kernel that does not launch or is wildly wrong; tests/ holds the tolerance rule),
one JSON line per (op, case, backend). DRY_RUN=1: CPU tensors, the cpu backend and Triton's
interpreter.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig

import torch

import gpu_common as G

F32, BF16 = torch.float32, torch.bfloat16


def _tool_version(cmd, line=-1):
    path = shutil.which(cmd[0])
    if not path:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (out.stdout + out.stderr).strip().splitlines()[line][:200]
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{path}: {e}"


def preflight(res):
    """What the build and the later stages need. Not ok only when the build cannot work."""
    inc = sysconfig.get_paths()["include"]
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    found = dict(python_h=os.path.exists(os.path.join(inc, "Python.h")), python_include=inc,
                 nvcc=_tool_version([os.path.join(cuda_home, "bin", "nvcc"), "--version"]) or _tool_version(
                     ["nvcc", "--version"]),
                 ninja=_tool_version(["ninja", "--version"]), cxx=_tool_version(["c++", "--version"], line=0),
                 compute_sanitizer=_tool_version(["compute-sanitizer", "--version"]),
                 arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"), max_jobs=os.environ.get("MAX_JOBS"),
                 disk_free_gib=round(shutil.disk_usage("/tmp").free / 2 ** 30, 1), cpus=os.cpu_count())
    for mod in ("pytest", "xdist", "setuptools", "wheel", "ninja"):
        found[f"py_{mod}"] = _importable(mod)
    missing = [k for k in ("python_h", "nvcc", "ninja", "cxx") if not found[k]]
    if os.environ.get("DRY_RUN") != "1" and not torch.cuda.is_available():
        missing.append("a CUDA device (DRY_RUN=1 runs the check's logic on the CPU)")
    status = "ok" if G.DRY or not missing else "failed"
    res.write(kind="preflight", status=status, missing=missing, **G.environment(), **found)
    return 0 if status == "ok" else 1


def _importable(mod):
    import importlib.util
    return importlib.util.find_spec(mod) is not None


def _small(x):
    """Dry run: C below 300 (the interpreter); the GPU run keeps the cases as written."""
    return min(x, 300) if G.DRY else x


def dps_case(backend, v, b, c, zdt, adt, reduction, tau_e):
    import dps_fast
    gen = torch.Generator().manual_seed(v * 1000 + b + c)
    n = 3 * b
    alpha = dps_fast.init_prior(torch.randint(0, c, (n,), generator=gen), c, dtype=adt).to(G.DEV)
    z = (torch.randn((v, b, c) if v > 1 else (b, c), generator=gen) * 3).to(G.DEV, zdt)
    idx = torch.randperm(n, generator=gen)[:b].to(G.DEV)
    out = {}
    for be in ("reference", backend):
        a, x = alpha.clone(), z.clone().requires_grad_(True)
        loss = dps_fast.dps_cross_entropy(x, idx, a, tau_e=tau_e, reduction=reduction, backend=be)
        loss.sum().backward()
        out[be] = (loss.detach().float(), x.grad.float(), a.float())
    return out


def soft_case(backend, b, c, zdt):
    import dps_fast
    gen = torch.Generator().manual_seed(b + c)
    z = (torch.randn(b, c, generator=gen) * 3).to(G.DEV, zdt)
    t = torch.softmax(torch.randn(b, c, generator=gen), -1).to(G.DEV, zdt)
    out = {}
    for be in ("reference", backend):
        x = z.clone().requires_grad_(True)
        loss = dps_fast.soft_cross_entropy(x, t, backend=be)
        loss.backward()
        out[be] = (loss.detach().float(), x.grad.float())
    return out


def supcon_case(backend, b, d, soft):
    import dps_fast
    gen = torch.Generator().manual_seed(b + d)
    f = torch.randn(2, b, d, generator=gen).to(G.DEV)
    kw = dict(soft_targets=torch.rand(b, 6, generator=gen).to(G.DEV)) if soft else \
        dict(labels=torch.randint(0, 5, (b,), generator=gen).to(G.DEV))
    out = {}
    for be in ("reference", backend):
        x = f.clone().requires_grad_(True)
        loss = dps_fast.supcon_loss(x, backend=be, **kw)
        loss.backward()
        out[be] = (loss.detach().float(), x.grad.float())
    return out


# (op, arguments after the backend): every op, each kernel path once. d = 1025 and 2100 take
# the Triton SupCon backward's D slices (before them: OutOfResources for any d > 512).
SMOKE_CASES = [
    ("dps", (1, 33, 10, F32, F32, "mean", 1.0)), ("dps", (2, 33, 1000, BF16, BF16, "mean", 0.5)),
    ("dps", (1, 17, 5000, F32, F32, "sum", 1.0)), ("dps", (3, 9, 100, F32, BF16, "none", 1.0)),
    ("soft", (33, 100, F32)), ("soft", (9, 131072, BF16)),
    ("supcon", (33, 24, False)), ("supcon", (20, 128, True)), ("supcon", (20, 1025, False)),
    ("supcon", (12, 2100, False)),
]


def run_smoke_case(backend, op, args):
    if op == "dps":
        v, b, c, *rest = args
        args = (v, b, _small(c), *rest)
        out = dps_case(backend, *args)
    elif op == "soft":
        out = soft_case(backend, args[0], _small(args[1]), args[2])
    else:
        out = supcon_case(backend, *args)  # d as written: the interpreter takes d = 2100 at M = 24
    ref, got = out["reference"], out[backend]
    # loose: bf16 outputs and the kernels' own summation order; tests/ apply the strict rule
    errs = [float((g - r).abs().max() / r.abs().max().clamp_min(1e-6)) for g, r in zip(got, ref)]
    finite = all(bool(torch.isfinite(g).all()) for g in got)
    return dict(args=[str(a) for a in args], max_rel_err=max(errs), finite=finite,
                status="ok" if finite and max(errs) < 5e-2 else "failed")


def smoke(res):
    import dps_fast
    backends = [b for b in dps_fast.available_backends(G.DEV) if b != "reference"]
    res.write(kind="backends", device=G.DEV, backends=backends)
    bad = 0 if backends or G.DRY else 1
    for backend in backends:
        for op, args in SMOKE_CASES:
            try:
                row = run_smoke_case(backend, op, args)
            except Exception as e:  # noqa: BLE001 - recorded; every other case still runs
                row = dict(args=[str(a) for a in args], status="failed", error=f"{type(e).__name__}: {e}"[:400])
            bad += row["status"] != "ok"
            res.write(kind="smoke", op=op, backend=backend, **row)
            G.sync()
    return 1 if bad else 0


def memcheck_workload(dev):
    """Every kernel path once on odd shapes (compute-sanitizer memcheck: out-of-bounds and
    misaligned accesses)."""
    import dps_fast
    for be in [b for b in dps_fast.available_backends(dev) if b != "reference"]:
        for c in (1, 10, 1000, 5000):
            a = dps_fast.init_prior(torch.randint(0, c, (64,), device=dev), c)
            z = torch.randn(2, 17, c, device=dev, requires_grad=True)
            dps_fast.dps_cross_entropy(z, torch.randperm(64, device=dev)[:17], a, backend=be).backward()
            dps_fast.soft_cross_entropy(z[0], torch.softmax(z[1].detach(), -1), backend=be).backward()
        for d in (24, 1025):
            f = torch.randn(2, 9 if d > 512 else 33, d, device=dev, requires_grad=True)
            dps_fast.supcon_loss(f, backend=be).backward()


def racecheck_workload(dev):
    """The kernels that share memory between threads. The CUDA DPS / soft-CE kernels reduce
    through shared memory at 256 threads a row (resident: C > 512 with V <= 2; streaming:
    C > 2048) and in every mean / sum finish; the SupCon
    kernels stage 16 x 128 feature tiles (D = 24: one chunk, D = 200: two) and the G tile; the
    Triton kernels (tl.dot, reductions) run the same workload. Small shapes: racecheck tracks
    every shared-memory access."""
    import dps_fast
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


WORKLOADS = {"memcheck": memcheck_workload, "racecheck": racecheck_workload}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("preflight", "smoke", "workload"))
    p.add_argument("tool", nargs="?", choices=tuple(WORKLOADS), help="workload: which sanitizer's")
    p.add_argument("--out", help="JSON lines are appended here")
    a = p.parse_args(argv)
    if a.what == "workload":
        WORKLOADS[a.tool](G.DEV)
        G.sync()
        print(f"{a.tool} workload done", flush=True)
        return 0
    res = G.Results(a.out, a.what)
    return preflight(res) if a.what == "preflight" else smoke(res)


if __name__ == "__main__":
    sys.exit(main())

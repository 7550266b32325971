"""GPU benchmarks of the device check (benchmarks/gpu_check.sh), two stages:

    python benchmarks/gpu_bench.py kernel --out results.jsonl --budget-s 80
    python benchmarks/gpu_bench.py step   --out results.jsonl --budget-s 65

kernel: the fused kernels alone (torch.ops, a preallocated gradient, no autograd, no
validation), each repetition after an L2 flush, against a device copy of the same byte
count timed in the same loop; GB/s on the minimal byte model of each case. The cases are
the ones the static review flags (issue 25), most valuable first.

step: the whole DPS step (forward + backward through autograd) of the fused backends (with
and without index validation) against the eager reference, the hand-written eager step of
the CPU suite (benchmarks/common.py::dps_by_hand) and that step under torch.compile, whose
warm-up runs under a time bound (a case over it is skipped and says so); then SupCon.

Every case is one JSON line, written when it is measured; a case the budget leaves out is a
line with status "skipped". DRY_RUN=1 runs the same logic on the CPU on tiny shapes.
"""
from __future__ import annotations

import argparse
import sys

import torch

import dps_fast
from dps_fast import _dispatch
from dps_fast import reference as R
import gpu_common as G
from common import dps_by_hand

F32, BF16 = torch.float32, torch.bfloat16
# (op, B, C, V, logits dtype, bank/target dtype), most valuable first: the large-B fp32 row
# lengths of the review, then 16-bit, two views, the large-C paths, soft CE.
KERNEL_CASES = [
    ("dps", 65536, 1000, 1, F32, F32), ("dps", 65536, 100, 1, F32, F32), ("dps", 65536, 10, 1, F32, F32),
    ("dps", 65536, 1000, 1, BF16, BF16), ("dps", 65536, 1000, 2, F32, F32), ("dps", 8192, 32000, 1, F32, F32),
    ("dps", 4096, 131072, 1, BF16, BF16), ("soft", 65536, 1000, 1, F32, F32), ("soft", 4096, 131072, 1, BF16, BF16),
    ("dps", 65536, 100, 2, F32, F32), ("dps", 65536, 10, 2, F32, F32), ("dps", 65536, 100, 1, BF16, BF16),
    ("dps", 65536, 10, 1, BF16, BF16), ("dps", 65536, 1000, 2, BF16, BF16), ("dps", 8192, 32000, 1, BF16, BF16),
    ("soft", 65536, 100, 1, F32, F32),
    # the plans' edges (dps_fast/kernels/dps_cross_entropy.py): the widest resident row in both
    # backends, and few rows of large C (Triton's split over a 2-D grid)
    ("dps", 65536, 4096, 1, F32, F32), ("dps", 256, 32000, 1, F32, F32),
]
# (B, C, logits and bank dtype): the step targets first
STEP_CASES = [(65536, 1000, F32), (256, 100, F32), (8192, 32000, BF16), (65536, 100, F32)]
SUPCON_CASES = [(8192, 128), (8192, 1024)]  # (M, d); d = 1024 runs the Triton backward's D slices
COMPILE_S = 45.0
# medians of 20; dry run: one call (the Triton interpreter costs 0.1-0.2 s a call even on tiny shapes)
REPS = 1 if G.DRY else 20  # bound on one cold torch.compile warm-up (fwd + bwd) of one shape


def dry_shape(b: int, c: int):
    """Tiny shapes for the dry run: the Triton interpreter costs 0.1-0.2 s per call even here."""
    return min(b, 8), min(c, 130)


def fused_backends():
    wanted = ("triton", "cuda") if G.DEV == "cuda" else ("cpu", "triton")
    return [b for b in wanted if _dispatch.available(b, G.DEV)]


def kernel_inputs(op, b, c, v, zdt, adt):
    gen = torch.Generator().manual_seed(b + c + v)
    shape = (v, b, c) if v > 1 else (b, c)
    z = (torch.randn(shape, generator=gen) * 3).to(G.DEV, zdt)
    if op == "soft":
        return z, None, torch.softmax(torch.randn(b, c, generator=gen), -1).to(G.DEV, adt)
    n = 2 * b  # rows gathered at random from a bank twice the batch: every row its own lines
    alpha = dps_fast.init_prior(torch.randint(0, c, (n,), generator=gen).to(G.DEV), c, dtype=adt)
    pool = [torch.randperm(n, generator=gen)[:b].to(G.DEV) for _ in range(4)]
    return z, pool, alpha


def kernel_call(backend, op, z, pool, bank, grad):
    ops = _dispatch.namespace(backend)
    if op == "soft":
        return lambda: ops.soft_ce_fwd(z, bank, grad, True, 1)
    k = [0]

    def call():
        k[0] += 1
        return ops.dps_ce_fwd(z, pool[k[0] % len(pool)], bank, grad, 0.95, 1.0, True, True, 1)
    return call


def kernel_bytes(op, b, c, v, zsz, asz):
    return G.dps_bytes(b, c, v, zsz, asz) if op == "dps" else G.soft_ce_bytes(b, c, zsz, asz)


def bench_kernel_case(backends, flush, op, b, c, v, zdt, adt):
    if G.DRY:
        b, c = dry_shape(b, c)
    z, pool, bank = kernel_inputs(op, b, c, v, zdt, adt)
    grad = torch.empty_like(z)  # preallocated: the kernel only, no allocator in the timing
    nbytes = kernel_bytes(op, b, c, v, z.element_size(), bank.element_size())
    row = dict(op=op, B=b, C=c, V=v, logits=str(zdt)[6:], bank=str(adt)[6:], bytes=nbytes, status="ok")
    src, dst = G.copy_pair(nbytes)
    fns = {"copy": lambda: dst.copy_(src)}
    fns.update({be: kernel_call(be, op, z, pool, bank, grad) for be in backends})
    try:
        times = G.time_interleaved(fns, flush, reps=REPS)
    except Exception as e:  # noqa: BLE001 - one backend's failure must not hide the others'
        times = _one_by_one(fns, flush, row, e)
    for name, t in times.items():
        row[f"{name}_ms"] = 1e3 * t
        row[f"{name}_gbps"] = nbytes / t / 1e9
        if name != "copy":
            row[f"{name}_of_copy"] = times["copy"] / t
    return row


def _one_by_one(fns, flush, row, first_error):
    """After a failure in the interleaved loop: each callable alone, errors recorded."""
    times = {}
    for name, fn in fns.items():
        try:
            times.update(G.time_interleaved({name: fn}, flush, reps=REPS))
        except Exception as e:  # noqa: BLE001
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
            row["status"] = "failed"
    row.setdefault("note", f"interleaved loop failed first: {type(first_error).__name__}")
    return times


def run_kernel_stage(res, deadline):
    backends = fused_backends()
    flush = G.l2_flush_buffer()
    src, dst = G.copy_pair(2 ** 31 if G.DEV == "cuda" else 2 ** 24)
    peak = G.time_interleaved({"copy": lambda: dst.copy_(src)}, flush, reps=10)["copy"]
    res.write(kind="copy_peak", bytes=2 * src.numel() * 4, gbps=2 * src.numel() * 4 / peak / 1e9,
              backends=backends, flush_bytes=flush.numel() * 4, **G.environment())
    del src, dst
    for case in KERNEL_CASES:
        label = dict(op=case[0], B=case[1], C=case[2], V=case[3], logits=str(case[4])[6:], bank=str(case[5])[6:])
        if deadline.left() <= 0:
            res.write(kind="kernel", status="skipped", reason="stage budget spent", **label)
            continue
        try:
            row = bench_kernel_case(backends, flush, *case)
        except torch.OutOfMemoryError:
            row = dict(label, status="failed", error="out of memory")
        res.write(kind="kernel", **row)
        G.free_cache()


def step_providers(backends):
    """name -> (step function, needs a compile warm-up). Fused first: they matter most."""
    provs = {}
    for be in backends:
        provs[be] = ((lambda name: lambda z, i, a: dps_fast.dps_cross_entropy(z, i, a, backend=name))(be), False)
        provs[f"{be}_novalidate"] = ((lambda name: lambda z, i, a: dps_fast.dps_cross_entropy(
            z, i, a, backend=name, validate=False))(be), False)
    provs["eager"] = (R.dps_cross_entropy, False)
    provs["hand"] = (dps_by_hand, False)
    provs["hand_compile"] = (torch.compile(dps_by_hand, dynamic=False), True)
    return provs


def warm_compiled(step, deadline, compile_s):
    """The compile warm-up of one shape under its bound: None, or why the case is skipped."""
    budget = min(compile_s, deadline.left() - 5)
    if budget < min(compile_s, 10):
        return f"skipped: {deadline.left():.0f} s left in the stage, under a compile's bound of {compile_s:.0f} s"
    try:
        with G.time_limit(budget):
            step()
            step()
            G.sync()
    except Exception as e:  # noqa: BLE001 - inductor may wrap the timeout in its own error
        if not G.is_timeout(e):
            raise
        torch._dynamo.reset()  # drop the half-built graph; the next case compiles afresh
        return f"skipped: compile exceeded its budget of {budget:.0f} s"
    return None


def bench_step_case(provs, flush, deadline, compile_s, b, c, dt):
    if G.DRY:
        b, c = dry_shape(b, c)
    z0, pool, alpha = kernel_inputs("dps", b, c, 1, dt, dt)
    z = z0.requires_grad_(True)
    row = dict(op="dps_step", B=b, C=c, V=1, logits=str(dt)[6:], bank=str(dt)[6:], status="ok",
               bytes=G.dps_bytes(b, c, 1, z.element_size(), alpha.element_size()),
               note="bytes: the minimal model; the fused backward of loss.backward() moves none on top (the buffer "
                    "is handed over, csrc/ops.cpp::scale_grad); eager and compiled steps move more")
    k = [0]
    for name, (fn, compiled) in provs.items():
        def step(fn=fn):
            k[0] += 1
            z.grad = None
            fn(z, pool[k[0] % len(pool)], alpha).backward()
        try:
            why = warm_compiled(step, deadline, compile_s) if compiled else None
            if why:
                row[f"{name}_status"] = why
                continue
            t = G.time_interleaved({name: step}, flush, reps=REPS)[name]
            row[f"{name}_ms"], row[f"{name}_gbps"] = 1e3 * t, row["bytes"] / t / 1e9
        except Exception as e:  # noqa: BLE001 - recorded; the other providers still run
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
            row["status"] = "failed"
        G.free_cache()
    for name in provs:
        for base in ("eager", "hand", "hand_compile"):
            if name not in ("eager", "hand", "hand_compile") and row.get(f"{name}_ms") and row.get(f"{base}_ms"):
                row[f"{name}_vs_{base}"] = row[f"{base}_ms"] / row[f"{name}_ms"]
    return row


def bench_supcon_case(backends, flush, m, d):
    if G.DRY:
        m, d = min(m, 32), min(d, 40)
    gen = torch.Generator().manual_seed(m + d)
    f = torch.randn(2, m // 2, d, generator=gen).to(G.DEV).requires_grad_(True)
    labels = torch.randint(0, 1000, (m // 2,), generator=gen).to(G.DEV)
    fns = {be: (lambda name: lambda: dps_fast.supcon_loss(f, labels, backend=name))(be) for be in backends}
    fns["eager"] = lambda: R.supcon_loss(f, labels)
    row = dict(op="supcon_step", M=m, d=d, status="ok", bytes=G.supcon_bytes(m, d))
    for name, fn in fns.items():
        def step(fn=fn):
            f.grad = None
            fn().backward()
        try:
            row[f"{name}_ms"] = 1e3 * G.time_interleaved({name: step}, flush, reps=1 if G.DRY else 5, warmup=1)[name]
        except Exception as e:  # noqa: BLE001
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
            row["status"] = "failed"
        G.free_cache()
    for be in backends:
        if row.get(f"{be}_ms") and row.get("eager_ms"):
            row[f"{be}_vs_eager"] = row["eager_ms"] / row[f"{be}_ms"]
    return row


def run_step_stage(res, deadline, compile_s):
    backends = fused_backends()
    flush = G.l2_flush_buffer()
    provs = step_providers(backends)
    res.write(kind="step_plan", backends=backends, providers=list(provs), compile_bound_s=compile_s)
    jobs = [("dps", x) for x in STEP_CASES[:2]] + [("supcon", x) for x in SUPCON_CASES[:1]] + \
           [("dps", x) for x in STEP_CASES[2:]] + [("supcon", x) for x in SUPCON_CASES[1:]]
    if G.DRY:  # the first three cases take every path; each cold compile attempt costs its 2 s bound
        jobs = jobs[:3]
    for kind, x in jobs:
        label = dict(op=f"{kind}_step", shape=[x[0], x[1]])
        if deadline.left() <= 0:
            res.write(kind="step", status="skipped", reason="stage budget spent", **label)
            continue
        try:
            row = bench_step_case(provs, flush, deadline, compile_s, *x) if kind == "dps" else \
                bench_supcon_case(backends, flush, *x)
        except torch.OutOfMemoryError:
            row = dict(label, status="failed", error="out of memory")
        res.write(kind="step", **row)
        G.free_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("kernel", "step"))
    p.add_argument("--out", required=True, help="JSON lines are appended here")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no new case after this")
    p.add_argument("--compile-s", type=float, default=None,
                   help=f"bound on one torch.compile warm-up (default {COMPILE_S:.0f} s; dry run 2 s)")
    a = p.parse_args(argv)
    res = G.Results(a.out, a.stage)
    deadline = G.Deadline(a.budget_s)
    if a.stage == "kernel":
        run_kernel_stage(res, deadline)
    else:
        run_step_stage(res, deadline, a.compile_s if a.compile_s is not None else (2.0 if G.DRY else COMPILE_S))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Probe the fused CPU DPS kernel alone (no autograd, no validation): timings or a
fixed amount of work for callgrind.

    # median time, GB/s on the byte model, against the copy bandwidth of the same process
    python benchmarks/kernel_probe.py --time
    # instruction counts per element (1 thread, the kernel only; divide by B*C*steps):
    valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*DpsStep*::operator()*' \
        python benchmarks/kernel_probe.py --b 1024 --n 5000 --steps 2 --threads 1
    # bit-identity against an earlier build: --save FILE once, then --compare FILE
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dps_fast  # noqa: E402,F401  (registers torch.ops.dps_fast)
from common import copy_bandwidth, dps_bytes  # noqa: E402

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(b, c, n, zdt, adt, v=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    alpha = dps_fast.init_prior(torch.randint(0, c, (n,), generator=gen), c, dtype=adt)
    shape = (v, b, c) if v > 1 else (b, c)
    z = (torch.randn(shape, generator=gen) * 3).to(zdt)
    pool = [torch.randperm(n, generator=gen)[:b] for _ in range(8)]
    return z, alpha, pool


def step(z, idx, alpha, grad, gamma=0.95, tau_e=1.0, posterior=True, update=True, reduction=1):
    return torch.ops.dps_fast.dps_ce_fwd(z, idx, alpha, grad, gamma, tau_e, posterior, update, reduction)


def timed(args):
    zdt, adt = DT[args.z], DT[args.a]
    z, alpha, pool = make_inputs(args.b, args.c, args.n, zdt, adt, args.v)
    grad = torch.empty_like(z)
    for k in range(3):
        step(z, pool[k], alpha, grad)
    ts = []
    for k in range(args.reps):
        idx = pool[k % len(pool)]
        if args.fresh_grad:
            grad = torch.empty_like(z)
        t0 = time.perf_counter()
        step(z, idx, alpha, grad, tau_e=args.tau)
        ts.append(time.perf_counter() - t0)
    med = statistics.median(ts)
    nbytes = dps_bytes(args.b, args.c, args.v, z.element_size(), alpha.element_size())
    copy = copy_bandwidth()
    gbps = nbytes / med / 1e9
    print(f"B={args.b} C={args.c} N={args.n} V={args.v} z={args.z} bank={args.a} threads={torch.get_num_threads()}: "
          f"median {1e3 * med:.3f} ms (min {1e3 * min(ts):.3f}), {gbps:.2f} GB/s, copy {copy:.2f} GB/s, "
          f"{100 * gbps / copy:.0f}% of copy; load {os.getloadavg()[0]:.2f}")


def cases():
    """Shapes / dtypes / options covering every branch of the kernel, for --save / --compare."""
    out = []
    for (b, c, v) in [(4096, 1000, 1), (300, 1023, 2), (64, 33, 1), (17, 7, 3), (5, 32773, 1), (2, 1, 1)]:
        for zdt in ("float32", "bfloat16", "float16"):
            for adt in ("float32", "bfloat16"):
                for tau, post, upd, red in ((1.0, True, True, 1), (2.0, False, True, 0), (1.0, False, False, 2)):
                    out.append((b, c, v, zdt, adt, tau, post, upd, red))
    return out


def run_case(case):
    b, c, v, zdt, adt, tau, post, upd, red = case
    n = max(2 * b, 50)
    z, alpha, pool = make_inputs(b, c, n, DT[zdt], DT[adt], v, seed=b + c + v)
    idx = pool[0].clone()
    zz = z.clone()
    if b > 3:  # a non-finite row and an out-of-range id
        zz.view(-1, c)[1, 0] = float("nan")
        zz.view(-1, c)[2, -1] = float("-inf")
        idx[3] = n + 5
    grad = torch.empty_like(zz)
    loss = step(zz, idx, alpha, grad, 0.9, tau, post, upd, red)
    return {"loss": loss, "grad": grad, "alpha": alpha}


def save_or_compare(path, compare):
    results = {repr(cs): run_case(cs) for cs in cases()}
    if not compare:
        torch.save(results, path)
        print(f"saved {len(results)} cases to {path}")
        return
    ref = torch.load(path)
    bad = 0
    for key, got in results.items():
        for name, t in got.items():
            r = ref[key][name]
            same = torch.equal(t.view(torch.uint8) if t.dim() else t, r.view(torch.uint8) if r.dim() else r) \
                or (t.dim() == 0 and (torch.isnan(t) & torch.isnan(r)).item())
            if not same:
                bad += 1
                print(f"DIFFERS: {key} {name}")
    print(f"{len(results)} cases, {bad} tensors differ")
    sys.exit(1 if bad else 0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--b", type=int, default=4096)
    p.add_argument("--c", type=int, default=1000)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--v", type=int, default=1)
    p.add_argument("--z", default="float32", choices=DT)
    p.add_argument("--a", default="float32", choices=DT)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="run this many steps, untimed (for callgrind)")
    p.add_argument("--time", action="store_true")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--fresh-grad", action="store_true", help="a new grad buffer per step, as the API does")
    p.add_argument("--save")
    p.add_argument("--compare")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.save or args.compare:
        save_or_compare(args.save or args.compare, bool(args.compare))
    elif args.time:
        timed(args)
    else:
        z, alpha, pool = make_inputs(args.b, args.c, args.n, DT[args.z], DT[args.a], args.v)
        grad = torch.empty_like(z)
        for k in range(args.steps):
            step(z, pool[k % len(pool)], alpha, grad, tau_e=args.tau)


if __name__ == "__main__":
    main()

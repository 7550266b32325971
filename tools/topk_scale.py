"""The top-k bank at ImageNet-21k scale on one process (issue 26, item 7): builds a
DPSLoss(top_k=K) for N samples and C classes from labels, steps it at batch B, saves its
state_dict and loads it into a fresh loss; prints the time and peak memory (VmHWM) of each,
and the bank's bytes. The dense float32 bank of the same N x C is printed for comparison.

    python tools/topk_scale.py --n 14200000 --c 21841 --k 32 --batch 1024 --steps 5
"""
import argparse
import dataclasses
import os
import resource
import statistics
import tempfile
import time

import torch

import dps_fast


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB -> GB


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=14_200_000)
    ap.add_argument("--c", type=int, default=21_841)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, args.c, (args.n,), generator=gen)
    print(f"N = {args.n:,}, C = {args.c:,}, k = {args.k}; labels {labels.nbytes / 2**30:.2f} GB; "
          f"dense float32 bank would be {args.n * args.c * 4 / 2**30:,.0f} GB")
    crit, t = timed(lambda: dps_fast.DPSLoss(labels, args.c, top_k=args.k, tau_e=1.0))  # as measured
    s = crit.store
    nbytes = sum(x.nbytes for x in (s.ids, s.vals, s.rest, s.bound))
    print(f"build: {t:.1f} s, bank {nbytes / 2**30:.2f} GB ({nbytes / args.n:.0f} bytes a row), "
          f"peak RSS {peak_gb():.2f} GB")
    times = {"cpu": [], "reference": []}  # the fused CPU kernel and the reference, alternately
    for _ in range(args.steps):
        for backend in times:
            crit.cfg = dataclasses.replace(crit.cfg, backend=backend)
            z = torch.randn(args.batch, args.c, generator=gen).requires_grad_()
            idx = torch.randperm(args.n, generator=gen)[:args.batch]
            _, t = timed(lambda: crit(z, idx).backward())
            times[backend].append(t)
    fused, ref = (statistics.median(times[b]) for b in ("cpu", "reference"))
    print(f"step at B = {args.batch}, fwd+bwd, medians of {args.steps}, alternating: fused CPU kernel "
          f"{fused * 1e3:.0f} ms, reference {ref * 1e3:.0f} ms ({ref / fused:.1f}x); peak RSS {peak_gb():.2f} GB; "
          f"{crit.topk_error()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bank.pt")
        _, t_save = timed(lambda: torch.save(crit.state_dict(), path))
        size = os.path.getsize(path)
        fresh = dps_fast.DPSLoss(labels, args.c, top_k=args.k, tau_e=1.0)
        _, t_load = timed(lambda: fresh.load_state_dict(torch.load(path, weights_only=True)))
    same = torch.equal(fresh.store.vals, s.vals) and torch.equal(fresh.store.ids, s.ids)
    print(f"state_dict save {t_save:.1f} s ({size / 2**30:.2f} GB file), load (verified) {t_load:.1f} s, "
          f"identical {same}; peak RSS {peak_gb():.2f} GB")


if __name__ == "__main__":
    main()

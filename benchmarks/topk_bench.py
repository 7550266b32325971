"""The top-k bank's step on CPU (issue 26, item 6) against the dense fused step and against
plain hard-label cross-entropy, measured side by side: every round times each provider once,
in turn (the order rotated each round), then one 256 MB copy, so the VM's drift hits them all
alike. Medians over rounds.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
        python benchmarks/topk_bench.py --out benchmarks/results/topk-bench.json

Providers (fwd+bwd, the loss's gradient written, 2 threads):
  topk       ``DPSLoss(labels, C, top_k=k)``'s step (the fused CPU kernel, csrc/cpu/topk_step.cpp),
             its gradient in the bank's reused buffer (GradCache, dps_fast/ops/_common.py)
  topk_fresh the same step with a new gradient buffer every step (as before GradCache)
  dense      ``DPSLoss(labels, C)``'s step on its dense float32 bank (the fused CPU kernel; the
             gradient buffer reused too above 32 MiB, as for top-k)
  ce_eager   ``F.cross_entropy(z, y)`` with hard labels (the floor: it reads the logits and
             writes the gradient too)
Byte model of the top-k step: logits read and gradient written (B*C*4 each), B rows of the bank
read and written (k ids int16/int32, k float32 values, rest and bound float32), the index.
The issue's targets at C >= 10,000: top-k at most 0.55x the dense step's time, at least 70% of
the same run's copy bandwidth on its byte model, at least 3x eager hard-label CE.
Run it outside the repository root (or after ``make install``): it measures the installed package.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dps_fast  # noqa: E402
from common import dps_bytes, environment  # noqa: E402

COPY_BYTES = 256 * 2 ** 20


def topk_bytes(b: int, c: int, k: int, id_bytes: int) -> int:
    return 2 * b * c * 4 + 2 * b * (k * (id_bytes + 4) + 8) + b * 8


def providers(b: int, c: int, k: int, n: int, gen):
    labels = torch.randint(0, c, (n,), generator=gen)
    topk = dps_fast.DPSLoss(labels, c, top_k=k, tau_e=1.0)  # the step alone (tau_e auto: results §6d)
    fresh = dps_fast.DPSLoss(labels, c, top_k=k, tau_e=1.0)
    fresh.store.grad_cache = None
    dense = dps_fast.DPSLoss(labels, c, tau_e=1.0)
    z = torch.randn(b, c, generator=gen).requires_grad_(True)
    pool = [torch.randperm(n, generator=gen)[:b] for _ in range(4)]
    y = torch.randint(0, c, (b,), generator=gen)
    return z, pool, {
        "topk": lambda idx: topk(z, idx).backward(),
        "topk_fresh": lambda idx: fresh(z, idx).backward(),
        "dense": lambda idx: dense(z, idx).backward(),
        "ce_eager": lambda idx: F.cross_entropy(z, y).backward(),
    }, topk.store.ids.element_size()


def measure(b: int, c: int, k: int, rounds: int) -> dict:
    gen = torch.Generator().manual_seed(b + c + k)
    z, pool, fns, id_bytes = providers(b, c, k, 4 * b, gen)
    src, dst = torch.ones(COPY_BYTES // 4), torch.empty(COPY_BYTES // 4)
    times = {name: [] for name in fns}
    copy = []
    names = list(fns)
    for r in range(rounds + 1):  # the first round warms up
        # the providers in turn, rotated each round: the one timed right after the 256 MB copy
        # finds cold caches (at [256, 1000] that made the first 0.7 ms slower, 2026-12-07)
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            z.grad = None
            t0 = time.perf_counter()
            fn(pool[r % len(pool)])
            if r:
                times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst.copy_(src)
        if r:
            copy.append(2 * COPY_BYTES / (time.perf_counter() - t0) / 1e9)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    gbps = topk_bytes(b, c, k, id_bytes) / (ms["topk"] / 1e3) / 1e9
    return {"B": b, "C": c, "k": k, **{f"{n}_ms": v for n, v in ms.items()},
            "topk_vs_dense": ms["topk"] / ms["dense"], "ce_vs_topk": ms["ce_eager"] / ms["topk"],
            "topk_gbps": gbps, "copy_gbps": statistics.median(copy), "of_copy": gbps / statistics.median(copy),
            "dense_gbps": dps_bytes(b, c) / (ms["dense"] / 1e3) / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--c", type=int, nargs="+", default=[1000, 10_000, 21_841])
    p.add_argument("--b", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--k", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--rounds", type=int, default=8)  # each of the 4 providers first twice
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = []
    print("| C | B | k | top-k ms | new buffer ms | dense ms | CE eager ms | top-k / dense | CE / top-k | top-k GB/s "
          "| of copy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in args.c:
        for b in args.b:
            for k in args.k:
                r = measure(b, c, k, args.rounds)
                rows.append(r)
                print(f"| {c:,} | {b} | {k} | {r['topk_ms']:.1f} | {r['topk_fresh_ms']:.1f} | {r['dense_ms']:.1f} | "
                      f"{r['ce_eager_ms']:.1f} | {r['topk_vs_dense']:.2f} | {r['ce_vs_topk']:.2f} | {r['topk_gbps']:.1f} | "
                      f"{100 * r['of_copy']:.0f}% |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "environment": environment(), "date": time.strftime("%Y-%m-%d")}, f, indent=1)


if __name__ == "__main__":
    main()

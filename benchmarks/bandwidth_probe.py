"""The fused DPS step's fraction of the copy bandwidth, measured interleaved (issue #14,
part 1). Every round times one public fwd+bwd step (random bank rows, as
benchmarks/test_bench_dps_cross_entropy.py does) and, right after it, one copy of a
256 MB buffer, so the VM's drift (its copy bandwidth ranged 14-37 GB/s across runs)
hits both alike. It reports the median of the per-round fractions, with their quartiles.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        python benchmarks/bandwidth_probe.py --out benchmarks/results/bandwidth-probe.json

Run it outside the repository root (or after ``make install``): it measures the installed
package. ``make bench`` runs it after the pytest benchmarks.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dps_fast  # noqa: E402
from common import dps_bytes, environment  # noqa: E402

COPY_BYTES = 256 * 2 ** 20  # well beyond the last-level cache (32 MiB on the benchmark VM)


def quartiles(xs):
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def probe(b: int, c: int, n: int, rounds: int) -> dict:
    gen = torch.Generator().manual_seed(b + c)
    alpha = dps_fast.init_prior(torch.randint(0, c, (n,), generator=gen), c)
    z = torch.randn(b, c, generator=gen).requires_grad_(True)
    pool = [torch.randperm(n, generator=gen)[:b] for _ in range(8)]
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    step_bytes = dps_bytes(b, c)
    step_gbps, copy_gbps = [], []
    for r in range(rounds + 2):  # two warm-up rounds
        idx = pool[r % len(pool)]
        z.grad = None
        t0 = time.perf_counter()
        dps_fast.dps_cross_entropy(z, idx, alpha, backend="cpu").backward()
        t1 = time.perf_counter()
        dst.copy_(src)
        t2 = time.perf_counter()
        if r >= 2:
            step_gbps.append(step_bytes / (t1 - t0) / 1e9)
            copy_gbps.append(2 * COPY_BYTES / (t2 - t1) / 1e9)  # read + write, as common.copy_bandwidth
    fractions = [s / c_ for s, c_ in zip(step_gbps, copy_gbps)]
    return {"B": b, "C": c, "N": n, "rounds": rounds, "step_gbps_quartiles": quartiles(step_gbps),
            "copy_gbps_quartiles": quartiles(copy_gbps), "fraction_quartiles": quartiles(fractions),
            "environment": environment()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b", type=int, default=4096)
    p.add_argument("--c", type=int, default=1000)
    p.add_argument("--n", type=int, default=100_000, help="bank rows")
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--out", help="write the result as JSON here")
    a = p.parse_args()
    r = probe(a.b, a.c, a.n, a.rounds)
    f, s, c = r["fraction_quartiles"], r["step_gbps_quartiles"], r["copy_gbps_quartiles"]
    print(f"[{a.b}, {a.c}], {a.n}-row bank, {torch.get_num_threads()} threads, {a.rounds} interleaved rounds: "
          f"fused fwd+bwd {s[1]:.1f} GB/s, copy {c[1]:.1f} GB/s; fraction of copy per round: median {f[1]:.0%} "
          f"(quartiles {f[0]:.0%}-{f[2]:.0%})")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(r, fh, indent=1)


if __name__ == "__main__":
    main()

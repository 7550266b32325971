"""The memory table of issue 26, measured: for each data set's N x C, a top-k bank built from
labels (``DPSLoss(labels, C, top_k=k)``, float32 and bfloat16 values): the bytes of its
tensors, the process's resident-memory growth while it was built, and what one step moves for
the host kind (the batch's rows to the step's device and back) and the sharded kind (packed rows
to their owners and back), counted on the tensors themselves. The dense banks' sizes are N x C
x 4 (float32) and x 2 (bfloat16); nothing dense is built.

    python tools/topk_memory.py                   # the four data sets of issue 26, k = 32, B = 1024
"""
import argparse
import gc

import torch

import dps_fast
from dps_fast.banks.topk_saves import pack

SETS = {"ImageNet-1k": (1_281_167, 1000), "iNaturalist 2021": (2_686_843, 10_000),
        "ImageNet-21K-P": (11_797_632, 11_221), "ImageNet-21k": (14_197_122, 21_841)}


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) * 1024 / 1e9  # kB -> GB (1e9 bytes)


def measure(n: int, c: int, k: int, batch: int, dtype: torch.dtype) -> dict:
    labels = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(0))
    gc.collect()
    before = rss_gb()
    crit = dps_fast.DPSLoss(labels, c, top_k=k, bank_dtype=dtype)
    grown = rss_gb() - before
    s = crit.store
    bank = sum(t.nbytes for t in (s.ids, s.vals, s.rest, s.bound))
    rows = s.take(torch.randperm(n)[:batch])  # what the host kind gathers for a step (int64 ids here)
    host_step = 2 * (batch * k * (s.ids.element_size() + s.vals.element_size()) + rows.rest.nbytes + rows.bound.nbytes)
    sharded_step = 2 * pack(rows).nbytes + batch * 8  # rows both ways, and the ids asked for
    out = dict(bank_gb=bank / 1e9, bytes_per_row=bank / n, labels_gb=s.labels.nbytes / 1e9, rss_growth_gb=grown,
               host_step_mb=host_step / 1e6, sharded_step_mb=sharded_step / 1e6)
    del crit, s, rows
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()
    print(f"k = {args.k}; a step of B = {args.batch}: bytes moved each way and back. GB = 1e9 bytes.")
    print("| data set | N × C | dense fp32 | dense bf16 | top-k, fp32 values | top-k, bf16 values | "
          "bytes a row (fp32 / bf16) | labels (int64) | RSS growth building it (fp32) | host step | "
          "sharded step | dense row step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (n, c) in SETS.items():
        f32 = measure(n, c, args.k, args.batch, torch.float32)
        b16 = measure(n, c, args.k, args.batch, torch.bfloat16)
        dense_step = 2 * args.batch * c * 4
        print(f"| {name} | {n:,} × {c:,} | {n * c * 4 / 1e9:,.1f} GB | {n * c * 2 / 1e9:,.1f} GB | "
              f"{f32['bank_gb']:.2f} GB | {b16['bank_gb']:.2f} GB | {f32['bytes_per_row']:.0f} / "
              f"{b16['bytes_per_row']:.0f} | {f32['labels_gb']:.2f} GB | {f32['rss_growth_gb']:.2f} GB | "
              f"{f32['host_step_mb']:.2f} MB | {f32['sharded_step_mb']:.2f} MB | {dense_step / 1e6:.0f} MB |",
              flush=True)


if __name__ == "__main__":
    main()

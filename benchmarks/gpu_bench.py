"""GPU benchmarks (run by benchmarks/gpu_check.sh on a CUDA machine).

Same providers and byte model as the CPU suite: eager reference, torch.compile
(reference), and the fused Triton and CUDA C++ kernels; DPS step fwd+bwd over
logits/bank dtypes, SupCon fwd+bwd with peak memory, and the device copy
bandwidth measured in the same run.

The JSON is rewritten after every row, and cases run most important first (the
issue's targets: (256, 100) and (65 536, 1000) in fp32, SupCon at M = 8192 and
65 536), so a run cut short by its time budget (--budget-s) or a kill still
leaves every finished row. Cases left out by the budget are listed as skipped.
"""
import argparse
import json
import os
import sys
import time

import torch

import dps_fast
from dps_fast import reference as R

DPS_SHAPES = [(256, 100, 50_000), (1024, 1000, 1_281_167), (65_536, 1000, 1_281_167), (8192, 32_000, 100_000)]
SUPCON_M = (8192, 65_536)
DEV = "cuda"
# --cpu-dry-run: the same script logic on tiny shapes on the CPU (checks the script, not speed)
DRY_DPS_SHAPES = [(16, 10, 100), (64, 100, 1000), (128, 100, 2000), (16, 300, 100)]
DRY_SUPCON_M = (64, 128)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def cuda_time(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    sync()
    if DEV != "cuda":
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def copy_gbps(nbytes=2 ** 30):
    if DEV != "cuda":
        nbytes = 2 ** 24
    src = torch.ones(nbytes // 4, device=DEV)
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_time(lambda: dst.copy_(src)) / 1e9


def providers(backends, with_compile):
    out = {"eager": R.dps_cross_entropy}
    if with_compile and DEV == "cuda":
        out["compile"] = torch.compile(R.dps_cross_entropy, dynamic=False)
    for b in backends:
        out[b] = (lambda be: (lambda z, i, a: dps_fast.dps_cross_entropy(z, i, a, backend=be, validate=False)))(b)
    return out


def dps_cases(quick):
    """(B, C, N, logits dtype, bank dtype): the targets' cases first, then the dtype matrix."""
    f32, bf16 = torch.float32, torch.bfloat16
    all_shapes = DPS_SHAPES if DEV == "cuda" else DRY_DPS_SHAPES
    shapes = all_shapes[:2] if quick else all_shapes
    first = [all_shapes[0] + (f32, f32), all_shapes[2] + (f32, f32)]
    rest = [(b, c, n, zd, ad) for (b, c, n) in shapes for zd in (f32, bf16) for ad in (f32, bf16)]
    return [x for x in first if quick is False or x[:3] in shapes] + [x for x in rest if x not in first]


def bench_dps_case(backends, copy, b, c, n, zdt, adt):
    # torch.compile recompiles for every shape and dtype: only for the fp32 and bf16/bf16 cases
    provs = providers(backends, with_compile=(zdt == adt))
    torch.manual_seed(0)
    alpha = dps_fast.init_prior(torch.randint(0, c, (n,), device=DEV), c, dtype=adt)
    z = torch.randn(b, c, device=DEV, dtype=zdt).requires_grad_(True)
    pool = [torch.randperm(n, device=DEV)[:b] for _ in range(4)]
    k = [0]
    # byte model: logits read + gradient written, bank rows read + written, the ids
    byts = b * c * 2 * z.element_size() + b * c * 2 * alpha.element_size() + 8 * b
    row = {"B": b, "C": c, "N": n, "logits": str(zdt), "bank": str(adt), "bytes": byts}
    for name, fn in provs.items():
        def step():
            k[0] += 1
            z.grad = None
            fn(z, pool[k[0] % 4], alpha).backward()
        try:
            t = cuda_time(step, reps=10 if b * c > 5e7 else 30)
            row[f"{name}_ms"] = 1e3 * t
            row[f"{name}_gbps"] = byts / t / 1e9
        except torch.OutOfMemoryError:
            row[f"{name}_ms"] = None
            row[f"{name}_note"] = "out of memory"
        except Exception as e:  # record, keep going
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
        empty_cache()
    for name in backends:
        if row.get(f"{name}_ms"):
            row[f"{name}_fraction_of_copy"] = row[f"{name}_gbps"] / copy
            for base in ("eager", "compile"):
                if row.get(f"{base}_ms"):
                    row[f"{name}_vs_{base}"] = row[f"{base}_ms"] / row[f"{name}_ms"]
    del alpha, z, pool
    empty_cache()
    return row


def bench_supcon_case(backends, m, d=128):
    row = {"M": m, "d": d}
    torch.manual_seed(0)
    f = torch.randn(2, m // 2, d, device=DEV).requires_grad_(True)
    labels = torch.randint(0, 1000, (m // 2,), device=DEV)
    fns = {b: (lambda be: (lambda: dps_fast.supcon_loss(f, labels, backend=be)))(b) for b in backends}
    fns["eager"] = lambda: R.supcon_loss(f, labels)  # last: at M = 65 536 it needs tens of GB
    for name, fn in fns.items():
        def step():
            f.grad = None
            fn().backward()
        try:
            if DEV == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                row[f"{name}_peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            row[f"{name}_ms"] = 1e3 * cuda_time(step, reps=5, warmup=1)
        except torch.OutOfMemoryError:
            row[f"{name}_ms"] = None
            row[f"{name}_note"] = "out of memory"
        except Exception as e:
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
        f.grad = None
        empty_cache()
    for name in backends:
        if row.get(f"{name}_ms") and row.get("eager_ms"):
            row[f"{name}_vs_eager"] = row["eager_ms"] / row[f"{name}_ms"]
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="start no new case after this many seconds")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run the script's logic on tiny shapes on the CPU (the cpu backend; no speed claims)")
    a = p.parse_args()
    global DEV
    if a.cpu_dry_run:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device")
    t_start = time.time()
    fused = ("triton", "cuda") if DEV == "cuda" else ("cpu",)
    backends = [b for b in fused if dps_fast._dispatch.available(b, DEV)]
    copy = copy_gbps()
    print(f"device copy bandwidth {copy:.0f} GB/s; fused backends {backends}", flush=True)
    res = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)", "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": __import__("triton").__version__ if "triton" in backends else None,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "copy_gbps": copy, "backends": backends,
           "byte_model": "DPS step: logits read + grad written (2*B*C*logit bytes) + bank rows read and "
                         "written (2*B*C*bank bytes) + ids (8*B)",
           "dps": [], "supcon": [], "skipped": [], "complete": False}

    def save():
        tmp = a.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(res, fh, indent=2)
        os.replace(tmp, a.out)

    dps = dps_cases(a.quick)
    sup = SUPCON_M if DEV == "cuda" else DRY_SUPCON_M
    jobs = [("dps", x) for x in dps[:2]] + [("supcon", m) for m in (sup[:1] if a.quick else sup)] + \
           [("dps", x) for x in dps[2:]]
    for kind, x in jobs:
        label = f"{kind} {x}" if kind == "supcon" else f"dps {x[:3]} {x[3]}/{x[4]}"
        if (res["dps"] or res["supcon"]) and time.time() - t_start > a.budget_s:  # the first case always runs
            res["skipped"].append(label)
            continue
        row = bench_dps_case(backends, copy, *x) if kind == "dps" else bench_supcon_case(backends, x)
        row["elapsed_s"] = round(time.time() - t_start, 1)
        res[kind].append(row)
        print(json.dumps(row), flush=True)
        save()
    res["complete"] = not res["skipped"]
    save()
    if res["skipped"]:
        print(f"time budget: {len(res['skipped'])} case(s) skipped: {res['skipped']}", flush=True)


if __name__ == "__main__":
    main()

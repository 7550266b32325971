"""GPU benchmarks (run by benchmarks/gpu_check.sh on a CUDA machine).

Same providers and byte model as the CPU suite: eager reference, torch.compile
(reference), and the fused Triton and CUDA C++ kernels; DPS step fwd+bwd over
logits/bank dtypes, SupCon fwd+bwd with peak memory, and the device copy
bandwidth measured in the same run. Writes one JSON.
"""
import argparse
import json
import sys
import time

import torch

import dps_fast
from dps_fast import reference as R

DPS_SHAPES = [(256, 100, 50_000), (1024, 1000, 1_281_167), (65_536, 1000, 1_281_167), (8192, 32_000, 100_000)]


def cuda_time(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
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
    src = torch.ones(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_time(lambda: dst.copy_(src)) / 1e9


def providers(backends):
    comp = torch.compile(R.dps_cross_entropy, dynamic=False)
    out = {"eager": R.dps_cross_entropy, "compile": comp}
    for b in backends:
        out[b] = (lambda be: (lambda z, i, a: dps_fast.dps_cross_entropy(z, i, a, backend=be, validate=False)))(b)
    return out


def bench_dps(backends, copy, quick):
    rows = []
    provs = providers(backends)
    for (b, c, n) in DPS_SHAPES[:2] if quick else DPS_SHAPES:
        for zdt in (torch.float32, torch.bfloat16):
            for adt in (torch.float32, torch.bfloat16):
                torch.manual_seed(0)
                alpha = dps_fast.init_prior(torch.randint(0, c, (n,), device="cuda"), c, dtype=adt)
                z = torch.randn(b, c, device="cuda", dtype=zdt).requires_grad_(True)
                pool = [torch.randperm(n, device="cuda")[:b] for _ in range(4)]
                k = [0]
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
                    except Exception as e:  # record, keep going
                        row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
                    torch.cuda.empty_cache()
                for name in backends:
                    if row.get(f"{name}_ms"):
                        row[f"{name}_fraction_of_copy"] = row[f"{name}_gbps"] / copy
                        for base in ("eager", "compile"):
                            if row.get(f"{base}_ms"):
                                row[f"{name}_vs_{base}"] = row[f"{base}_ms"] / row[f"{name}_ms"]
                print(json.dumps(row), flush=True)
                rows.append(row)
                del alpha, z, pool
                torch.cuda.empty_cache()
    return rows


def bench_supcon(backends, quick):
    rows = []
    d = 128
    for m in ((8192,) if quick else (8192, 65_536)):
        row = {"M": m, "d": d}
        torch.manual_seed(0)
        f = torch.randn(2, m // 2, d, device="cuda").requires_grad_(True)
        labels = torch.randint(0, 1000, (m // 2,), device="cuda")
        fns = {"eager": lambda: R.supcon_loss(f, labels)}
        for b in backends:
            fns[b] = (lambda be: (lambda: dps_fast.supcon_loss(f, labels, backend=be)))(b)
        for name, fn in fns.items():
            def step():
                f.grad = None
                fn().backward()
            try:
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
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device")
    backends = [b for b in ("triton", "cuda") if dps_fast._dispatch.available(b, "cuda")]
    copy = copy_gbps()
    print(f"device copy bandwidth {copy:.0f} GB/s; fused backends {backends}", flush=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": __import__("triton").__version__ if "triton" in backends else None,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "copy_gbps": copy, "backends": backends,
           "dps": bench_dps(backends, copy, a.quick), "supcon": bench_supcon(backends, a.quick)}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()

"""Banks at scale: memory per rank, traffic, and step time per bank kind.

    python benchmarks/distributed_bench.py benchmarks/results/distributed.json

1. The byte model (dps_fast.distributed.traffic_model) on the ImageNet bank
   (1,281,167 x 1000, float32), world sizes 2, 4, 8, local batch 256.
2. Memory, measured: a sharded bank of N = 2,000,000 x C = 100 float32 (800 MB) over
   2 gloo ranks. Per rank, the peak resident-memory growth (VmHWM) while the bank is
   built from the labels, and while a save of it is loaded back at 2 and at 3 ranks,
   against the size of the rank's shard (target: at most 1.3x).
3. Step time per bank kind at the same global batch (512 samples, C = 100, N = 200,000):
   local and host (one process), replicated and sharded (2 gloo ranks x 256), each with
   the fused CPU step and with the plain-PyTorch path (backend="reference"); medians, and
   the fraction of the step spent inside collectives.
"""
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dps_fast
from dps_fast import distributed as D

N_MEM, C_MEM = 2_000_000, 100
N_STEP, C_STEP, B_GLOBAL, STEPS, WARMUP = 200_000, 100, 512, 40, 5


def rss_kb(field="VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def peak_growth_mb(fn):
    """MB of peak RSS growth while fn() runs (its result is kept alive)."""
    before = rss_kb()
    reset_peak()
    out = fn()
    return out, (rss_kb("VmHWM") - before) / 1024


def _init(rank, world, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _memory_worker(rank, world, store, folder, out, build_only):
    _init(rank, world, store)
    labels = torch.randint(0, C_MEM, (N_MEM,), generator=torch.Generator().manual_seed(0))
    crit, grow = peak_growth_mb(lambda: D.DistributedDPSLoss(labels, C_MEM, mode="sharded", tau_e=1.0))
    shard_mb = crit.bank.numel() * crit.bank.element_size() / 2 ** 20
    res = {"world": world, "rank": rank, "shard_mb": shard_mb, "build_growth_mb": grow}
    if build_only:
        D.save_bank(crit, folder)
    else:
        del crit
        crit = D.DistributedDPSLoss(labels, C_MEM, mode="sharded", tau_e=1.0)
        _, res["load_growth_mb"] = peak_growth_mb(lambda: D.load_bank(crit, folder))
    torch.save(res, f"{out}-{world}-{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def measure_memory():
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "bank")
        runs = []
        for world, build_only in ((2, True), (2, False), (3, False)):
            store = os.path.join(tmp, f"store-{world}-{build_only}")
            mp.spawn(_memory_worker, args=(world, store, folder, os.path.join(tmp, "m"), build_only), nprocs=world)
            runs += [torch.load(os.path.join(tmp, f"m-{world}-{r}.pt")) for r in range(world)]
        return runs


def _step_loop(crit, idx_for, z_for):
    times, waits = [], []
    comm = getattr(crit.store, "comm", None)
    for s in range(STEPS):
        idx, z = idx_for(s), z_for(s)
        if dist.is_initialized():
            dist.barrier()
        w0 = comm.wait_s if comm else 0.0
        t0 = time.perf_counter()
        crit(z, idx).backward()
        times.append(time.perf_counter() - t0)
        waits.append((comm.wait_s if comm else 0.0) - w0)
    t, w = sorted(times[WARMUP:]), sorted(waits[WARMUP:])
    return {"step_ms_median": 1e3 * t[len(t) // 2], "comm_wait_fraction": w[len(w) // 2] / t[len(t) // 2],
            "bytes_per_step": comm.received_bytes / STEPS if comm else 0}


def _batch(s, world, rank):
    order = torch.randperm(N_STEP, generator=torch.Generator().manual_seed(100 + s))[:B_GLOBAL]
    z = torch.randn(B_GLOBAL, C_STEP, generator=torch.Generator().manual_seed(200 + s))
    return order[rank::world], z[rank::world].clone().requires_grad_(True)


def _labels():
    return torch.randint(0, C_STEP, (N_STEP,), generator=torch.Generator().manual_seed(0))


def _step_worker(rank, world, store, mode, backend, out):
    _init(rank, world, store)
    crit = D.DistributedDPSLoss(_labels(), C_STEP, mode=mode, backend=backend, tau_e=1.0)  # the step alone
    res = _step_loop(crit, lambda s: _batch(s, world, rank)[0], lambda s: _batch(s, world, rank)[1])
    torch.save(res, f"{out}-{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def measure_step(kind, backend):
    if kind in ("local", "host"):
        torch.set_num_threads(1)
        crit = dps_fast.DPSLoss(_labels(), C_STEP, bank=kind, backend=backend, tau_e=1.0)
        return _step_loop(crit, lambda s: _batch(s, 1, 0)[0], lambda s: _batch(s, 1, 0)[1])
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_step_worker, args=(2, os.path.join(tmp, "store"), kind, backend, os.path.join(tmp, "r")), nprocs=2)
        return torch.load(os.path.join(tmp, "r-0.pt"))


def markdown(model, mem, steps) -> str:
    lines = ["| world | replicated bank / rank | sharded bank / rank | replicated bytes / step | sharded bytes / step |",
             "|---|---|---|---|---|"]
    for t in model:
        lines.append(f"| {t['world']} | {t['replicated_bank_bytes'] / 1e9:.2f} GB | "
                     f"{t['sharded_bank_bytes'] / 1e9:.2f} GB | {t['replicated_step_bytes'] / 1e6:.2f} MB | "
                     f"{t['sharded_step_bytes'] / 1e6:.2f} MB |")
    lines += ["", f"Sharded bank {N_MEM:,} x {C_MEM} float32 ({N_MEM * C_MEM * 4 / 1e6:.0f} MB), peak RSS growth "
              "per rank:", "", "| what | world | rank | shard MiB | peak growth MiB | growth / shard |", "|---|---|---|---|---|---|"]
    for r in mem:
        key = "build_growth_mb" if "load_growth_mb" not in r else "load_growth_mb"
        what = "build from labels" if key == "build_growth_mb" else "load_bank (saved at 2 ranks)"
        lines.append(f"| {what} | {r['world']} | {r['rank']} | {r['shard_mb']:.0f} | {r[key]:.0f} | "
                     f"{r[key] / r['shard_mb']:.2f}x |")
    lines += ["", f"Step time, global batch {B_GLOBAL}, C = {C_STEP}, N = {N_STEP:,} (distributed: 2 gloo ranks x "
              f"{B_GLOBAL // 2}; 1 thread per process):", "",
              "| bank | fused ms | plain PyTorch ms | fused vs plain | in collectives (fused) | bytes / rank / step |",
              "|---|---|---|---|---|---|"]
    for kind, (f, p) in steps.items():
        lines.append(f"| {kind} | {f['step_ms_median']:.2f} | {p['step_ms_median']:.2f} | "
                     f"{p['step_ms_median'] / f['step_ms_median']:.2f}x | {100 * f['comm_wait_fraction']:.0f}% | "
                     f"{f['bytes_per_step'] / 1e3:.1f} kB |")
    return "\n".join(lines)


def main(out_path):
    model = [D.traffic_model(1_281_167, 1000, 256, w) for w in (2, 4, 8)]
    mem = measure_memory()
    steps = {k: (measure_step(k, None), measure_step(k, "reference")) for k in ("local", "host", "replicated",
                                                                                 "sharded")}
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "imagenet_model": model, "memory": mem,
           "steps": {k: {"fused": f, "reference": p} for k, (f, p) in steps.items()}}
    with open(out_path, "w") as f:
        json.dump(res, f, indent=2)
    md = markdown(model, mem, steps)
    with open(out_path.replace(".json", ".md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/distributed.json")

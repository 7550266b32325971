"""Replicated vs sharded DPS banks: memory, traffic and step time.

    python benchmarks/distributed_bench.py benchmarks/results/distributed.json

1. The byte model (dps_fast.distributed.traffic_model) on the ImageNet bank
   (1,281,167 x 1000, float32), world sizes 2, 4, 8, local batch 256.
2. Measured with gloo on this machine: 2 ranks, a smaller bank (N = 200,000, C = 100),
   local batch 256: bytes the collectives deliverd per rank and step (counted on the
   receive buffers), per-rank bank bytes, and the median step time of each mode.
"""
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dps_fast import distributed as D

N_MEAS, C_MEAS, B_MEAS, STEPS = 200_000, 100, 256, 40


def _worker(rank, world, store, mode, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    crit = D.DistributedDPSLoss(torch.randint(0, C_MEAS, (N_MEAS,), generator=torch.Generator().manual_seed(0)),
                                C_MEAS, mode=mode)
    gen = torch.Generator().manual_seed(1)
    times = []
    for s in range(STEPS):
        order = torch.randperm(N_MEAS, generator=gen)[: world * B_MEAS]
        idx = order[rank::world]
        z = torch.randn(B_MEAS, C_MEAS, requires_grad=True)
        dist.barrier()
        if s == 5:
            crit.comm_bytes = 0
        t0 = time.perf_counter()
        crit(z, idx).backward()
        times.append(time.perf_counter() - t0)
    steady = times[5:]
    steady.sort()
    res = {"mode": mode, "world": world, "rank": rank, "step_ms_median": 1e3 * steady[len(steady) // 2],
           "bytes_per_step": crit.comm_bytes / (STEPS - 5), "bank_bytes": crit.bank.numel() * crit.bank.element_size()}
    torch.save(res, f"{out}-{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def measure(mode, world=2):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), mode, os.path.join(tmp, "r")), nprocs=world)
        return [torch.load(os.path.join(tmp, f"r-{r}.pt")) for r in range(world)]


def main(out_path):
    model = [D.traffic_model(1_281_167, 1000, 256, w) for w in (2, 4, 8)]
    meas = {m: measure(m) for m in ("replicated", "sharded")}
    pred = D.traffic_model(N_MEAS, C_MEAS, B_MEAS, 2)
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "imagenet_model": model,
           "measured": {"N": N_MEAS, "C": C_MEAS, "B_local": B_MEAS, "world": 2, "runs": meas,
                        "model_at_this_shape": pred}}
    with open(out_path, "w") as f:
        json.dump(res, f, indent=2)
    lines = ["| world | replicated bank / rank | sharded bank / rank | replicated bytes / step | sharded bytes / step |",
             "|---|---|---|---|---|"]
    for t in model:
        lines.append(f"| {t['world']} | {t['replicated_bank_bytes'] / 1e9:.2f} GB | {t['sharded_bank_bytes'] / 1e9:.2f} GB | "
                     f"{t['replicated_step_bytes'] / 1e6:.2f} MB | {t['sharded_step_bytes'] / 1e6:.2f} MB |")
    lines += ["", f"Measured, gloo, 2 ranks, N={N_MEAS}, C={C_MEAS}, local batch {B_MEAS}:", "",
              "| mode | bank / rank | bytes delivered / rank / step (measured) | byte model | step ms (median) |",
              "|---|---|---|---|---|"]
    for m, runs in meas.items():
        r0 = runs[0]
        lines.append(f"| {m} | {r0['bank_bytes'] / 1e6:.1f} MB | {r0['bytes_per_step'] / 1e3:.1f} kB | "
                     f"{pred[m + '_step_bytes'] / 1e3:.1f} kB | {r0['step_ms_median']:.2f} |")
    md = "\n".join(lines)
    with open(out_path.replace(".json", ".md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/distributed.json")

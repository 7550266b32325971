"""The top-k bank at ImageNet-21k scale across a change of world size (issue 26, item 7): W
gloo ranks each build their shard of a sharded ``DistributedDPSLoss(top_k=K)`` from the
labels, step it at a global batch B, and ``save_bank`` it; then W' ranks (another world size)
``load_bank`` the save (each reading only its rows, verified) and step it again. Prints, per
phase and rank, the time of each part and the peak memory (VmHWM); the reload is checked by
checksums of every saved value, id, rest and bound, weighted by row position. Needs 2k + 2
float32 numbers a row on disk (3.5 GB at the defaults) under --dir.

    python tools/topk_scale_dist.py --dir /tmp/topk-save                 # 14.2M x 21,841, k 32, 2 -> 1
    python tools/topk_scale_dist.py --dir /tmp/s --n 100000 --save-world 1 --load-world 2
"""
import argparse
import json
import os
import statistics
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from topk_scale import peak_gb, timed  # tools/, beside this file

from dps_fast.distributed import DistributedDPSLoss, load_bank, save_bank


def bank_sums(crit) -> list[float]:
    """Checksums of this rank's rows, float64, a chunk at a time: per tensor (values, class ids,
    rest, bound), the sum and the sum weighted by each row's global id, so that a row reloaded
    at the wrong position changes them."""
    s, held = crit.store.local, crit.store.held_ids().double()
    out = [0.0] * 8
    for i in range(0, held.shape[0], 2 ** 16):  # 16 MB of float64 at k = 32: no new peak
        gid = held[i:i + 2 ** 16]
        for j, x in enumerate((s.vals, s.ids, s.rest, s.bound)):
            part = x[i:i + 2 ** 16].double()
            part = part.sum(1) if part.dim() == 2 else part
            out[2 * j] += float(part.sum())
            out[2 * j + 1] += float((part * gid).sum())
    return out


def step(crit, a, gen, world, rank) -> float:
    """One training step at global batch a.batch (this rank's share of a random permutation);
    the seconds of forward + backward."""
    idx = torch.randperm(a.n, generator=gen)[:a.batch][rank::world]
    z = torch.randn(len(idx), a.c, generator=gen).requires_grad_()
    dist.barrier()
    _, t = timed(lambda: crit(z, idx).backward())
    return t


def worker(rank, world, phase, a, store_dir):
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/{phase}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    out = {"phase": phase, "rank": rank, "world": world}
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, a.c, (a.n,), generator=gen)
    crit, out["build_s"] = timed(lambda: DistributedDPSLoss(labels, a.c, mode="sharded", top_k=a.k, tau_e=1.0))
    out["build_peak_gb"] = peak_gb()
    if phase == "load":
        _, out["load_s"] = timed(lambda: load_bank(crit, a.dir))
        out["load_peak_gb"] = peak_gb()
        out["sums_after_load"] = bank_sums(crit)
    gen.manual_seed(1 if phase == "save" else 2)  # the same permutation on every rank of a phase
    out["step_s"] = statistics.median(step(crit, a, gen, world, rank) for _ in range(a.steps))
    out["step_peak_gb"] = peak_gb()
    if phase == "save":
        out["sums_saved"] = bank_sums(crit)
        _, out["save_s"] = timed(lambda: save_bank(crit, a.dir))
        out["save_peak_gb"] = peak_gb()
    with open(os.path.join(store_dir, f"{phase}{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def report(store_dir, phase, world) -> list[dict]:
    outs = [json.load(open(os.path.join(store_dir, f"{phase}{r}.json"))) for r in range(world)]
    for o in outs:
        parts = ", ".join(f"{k[:-2]} {o[k]:.1f} s" for k in ("build_s", "load_s", "save_s") if k in o)
        peaks = ", ".join(f"{k[:-8]} {o[k]:.2f}" for k in o if k.endswith("_peak_gb"))
        print(f"{phase} at world {world}, rank {o['rank']}: {parts}, step (median) {o['step_s'] * 1e3:.0f} ms; "
              f"peak RSS GB after: {peaks}", flush=True)
    return outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="folder for the save (created; its bank files replaced)")
    ap.add_argument("--n", type=int, default=14_200_000)
    ap.add_argument("--c", type=int, default=21_841)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--save-world", type=int, default=2)
    ap.add_argument("--load-world", type=int, default=1)
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    print(f"N = {a.n:,}, C = {a.c:,}, k = {a.k}, global batch {a.batch}; save at world {a.save_world}, "
          f"load at world {a.load_world}; {torch.get_num_threads()} threads in all", flush=True)
    with tempfile.TemporaryDirectory() as store_dir:
        mp.spawn(worker, args=(a.save_world, "save", a, store_dir), nprocs=a.save_world, join=True)
        saved = report(store_dir, "save", a.save_world)
        size = sum(os.path.getsize(os.path.join(a.dir, f)) for f in os.listdir(a.dir))
        print(f"on disk: {size / 2**30:.2f} GB ({size / a.n:.0f} bytes a row)", flush=True)
        mp.spawn(worker, args=(a.load_world, "load", a, store_dir), nprocs=a.load_world, join=True)
        loaded = report(store_dir, "load", a.load_world)
    want = [sum(o["sums_saved"][i] for o in saved) for i in range(8)]
    got = [sum(o["sums_after_load"][i] for o in loaded) for i in range(8)]
    same = all(abs(w - g) <= 1e-9 * max(1.0, abs(w)) for w, g in zip(want, got))
    print(f"reloaded bank equals the saved one (checksums of values, ids, rest, bound, plain and "
          f"weighted by row id): {same}")


if __name__ == "__main__":
    main()

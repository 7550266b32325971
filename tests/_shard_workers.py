"""Process bodies for tests/test_shard_files.py (importable by spawned children): real
two-rank saves to tamper with, and a two-rank load of a damaged save."""
import os
import shutil

import torch
import torch.distributed as dist

from dps_fast import distributed as D
from dps_fast.banks import shard_files as SF

N, C = 17, 4


def _loss(n=N, c=C, seed=0):
    crit = D.DistributedDPSLoss(torch.arange(n) % c, c, mode="sharded", timeout_s=30)
    idx = torch.arange(dist.get_rank(), n, dist.get_world_size())
    crit(torch.randn(len(idx), c, generator=torch.Generator().manual_seed(seed + dist.get_rank())), idx)
    return crit


def _load_outcome(crit, folder):
    before = crit.bank.clone()
    try:
        D.load_bank(crit, folder)
        outcome = "no error"
    except (ValueError, FileNotFoundError) as e:
        outcome = f"{type(e).__name__}: {e}"
    return {"outcome": outcome, "unchanged": torch.equal(crit.bank, before)}


def worker_saves(rank, world, store_dir, out_dir):
    """Saves a (17 x 4, two updates), b (17 x 4, other values), n15 (15 x 4), c5 (17 x 5) at
    two ranks; then loads a copy of a whose rank-1 file has one flipped byte, and one whose
    rank-1 file is missing."""
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world)
    fulls = {}
    for name, n, c, seed in (("a", N, C, 0), ("b", N, C, 7), ("n15", 15, C, 0), ("c5", N, 5, 0)):
        crit = _loss(n, c, seed)
        D.save_bank(crit, os.path.join(out_dir, name))
        fulls[name] = crit.full_bank()
    bad = os.path.join(out_dir, "bad")
    if rank == 0:
        shutil.copytree(os.path.join(out_dir, "a"), bad)
        path = SF.shard_path(bad, 1, world)
        raw = bytearray(open(path, "rb").read())
        raw[-1] ^= 0x10
        open(path, "wb").write(bytes(raw))
        gone = os.path.join(out_dir, "gone")
        shutil.copytree(os.path.join(out_dir, "a"), gone)
        os.remove(SF.shard_path(gone, 1, world))
    dist.barrier()
    res = _load_outcome(_loss(seed=3), bad)  # rank 0 reads only file 0, which is intact
    res["missing"] = _load_outcome(_loss(seed=3), os.path.join(out_dir, "gone"))
    torch.save(res, os.path.join(out_dir, f"agree{rank}.pt"))
    if rank == 0:
        torch.save(fulls, os.path.join(out_dir, "fulls.pt"))
    dist.barrier()
    dist.destroy_process_group()

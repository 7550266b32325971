"""Process bodies for tests/test_tau_e_auto.py (importable by spawned children)."""
import os

import torch
import torch.distributed as dist

from dps_fast.distributed import DistributedDPSLoss

N, C = 24, 5


def worker_two_ranks(rank, world, store_dir, mode, out_dir):
    """Every rank steps its half of each global batch (local batches of unequal size); each
    records tau_e after every step."""
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world)
    try:
        crit = DistributedDPSLoss(torch.arange(N) % C, C, mode=mode, tau_e="auto", c=4.0, eps=0.5)
        gen = torch.Generator().manual_seed(0)
        taus = []
        for _ in range(8):
            ids = torch.randperm(N, generator=gen)[:7]
            z = torch.randn(7, C, generator=gen) * 3
            mine = slice(0, 4) if rank == 0 else slice(4, 7)
            crit(z[mine], ids[mine])
            taus.append(crit.tau_e)
        torch.save(taus, os.path.join(out_dir, f"taus{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()

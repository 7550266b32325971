"""Process bodies for tests/test_tau_e_auto.py (importable by spawned children)."""
import os

import torch
import torch.distributed as dist

from dps_fast.distributed import DistributedDPSLoss, load_bank, save_bank

N, C = 24, 5


def make(mode):
    return DistributedDPSLoss(torch.arange(N) % C, C, mode=mode, tau_e="auto", c=4.0, eps=0.5)


def steps(crit, rank, count, gen):
    """``count`` global batches of 7: rank 0 steps 4 samples, rank 1 the other 3; tau_e after each."""
    taus = []
    for _ in range(count):
        ids = torch.randperm(N, generator=gen)[:7]
        z = torch.randn(7, C, generator=gen) * 3
        mine = slice(0, 4) if rank == 0 else slice(4, 7)
        crit(z[mine], ids[mine])
        taus.append(crit.tau_e)
    return taus


def worker_two_ranks(rank, world, store_dir, mode, out_dir):
    """Every rank steps its part of each global batch (local batches of unequal size) and
    records tau_e after every step. Mid-pass, a checkpoint as the trainer writes one (the rows
    through save_bank, tau_e_state with the pass's sums over both ranks) is loaded into fresh
    losses; they go on exactly as the first ones."""
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world)
    try:
        crit, gen = make(mode), torch.Generator().manual_seed(0)
        taus = steps(crit, rank, 5, gen)  # 35 global samples: one adaptation, then 11 into the second pass
        saved = crit.tau_e_state()
        save_bank(crit, os.path.join(store_dir, "bank"))
        resumed = make(mode)
        load_bank(resumed, os.path.join(store_dir, "bank"))
        resumed.load_tau_e_state(saved)
        at = gen.get_state()
        taus += steps(crit, rank, 4, gen)
        gen.set_state(at)
        again = steps(resumed, rank, 4, gen)
        same = torch.equal(resumed.full_bank(), crit.full_bank())
        torch.save({"taus": taus, "resumed": again, "same_bank": same, "saved": saved},
                   os.path.join(out_dir, f"taus{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()

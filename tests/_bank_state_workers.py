"""Process bodies for tests/test_bank_state.py (importable by spawned children): a two-rank
state_dict load where only one rank's state dict is bad."""
import os

import torch
import torch.distributed as dist

from dps_fast import distributed as D

N, C = 11, 4


def worker_one_bad_rank(rank, world, store_dir, out_dir, mode, bad_rank):
    """Every rank loads its own state dict; rank ``bad_rank``'s holds a NaN. Each rank records
    its outcome and whether its bank and labels are unchanged."""
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world)
    crit = D.DistributedDPSLoss(torch.arange(N) % C, C, mode=mode, timeout_s=30)
    sd = crit.state_dict()
    sd["bank"] = sd["bank"].clone() + 1.0  # a valid, different bank
    if rank == bad_rank:
        sd["bank"][0, 0] = float("nan")
    before = crit.bank.clone(), crit.given_labels.clone()
    try:
        crit.load_state_dict(sd)
        outcome = "no error"
    except RuntimeError as e:
        outcome = str(e)
    unchanged = torch.equal(crit.bank, before[0]) and torch.equal(crit.given_labels, before[1])
    torch.save({"outcome": outcome, "unchanged": unchanged}, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()

"""Process bodies for tests/test_topk_bank.py's two-rank test (importable by spawned children)."""
import os

import torch
import torch.distributed as dist

from dps_fast.distributed import DistributedDPSLoss

N, C, K = 30, 12, 3


def global_steps():
    """The same global batches on every rank (and in the one-process reference)."""
    gen = torch.Generator().manual_seed(4)
    return [(torch.randn(9, C, generator=gen) * 3, torch.randperm(N, generator=gen)[:9]) for _ in range(5)]


def worker_replicated(rank, world, store_dir, out_dir):
    """Rank r steps samples r, r + 2, ... of each global batch; saves its replica."""
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world)
    try:
        crit = DistributedDPSLoss(torch.arange(N) % C, C, mode="replicated", top_k=K, c=5.0, eps=0.05, gamma=0.9,
                                  reduction="sum")
        losses = []
        for z, idx in global_steps():
            losses.append(crit(z[rank::world], idx[rank::world]).detach())
        torch.save({"state": crit.state_dict(), "losses": losses, "tau_e_state": crit.tau_e_state()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def worker_sharded(rank, world, store_dir, out_dir):
    """Rank r holds rows r, r + 2, ... and steps samples r, r + 2, ... of each global batch;
    saves its shard, the read-outs (collectives) and a state-dict round trip."""
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world)
    try:
        make = lambda: DistributedDPSLoss(torch.arange(N) % C, C, mode="sharded", top_k=K, c=5.0,  # noqa: E731
                                          eps=0.05, gamma=0.9, reduction="sum")
        crit = make()
        losses = []
        for step, (z, idx) in enumerate(global_steps()):
            valid = None if step != 2 else torch.arange(9)[rank::world] % 4 != 0  # padding in one step
            losses.append(crit(z[rank::world], idx[rank::world], valid=valid).detach())
        state = crit.state_dict()
        again = make()
        again.load_state_dict(state)
        crit.eval()
        eval_loss = crit(*[t[rank::world] for t in global_steps()[0]]).detach()
        out = {"state": {k: v.clone() for k, v in state.items()}, "losses": losses, "eval_loss": eval_loss,
               "full": crit.full_bank(), "targets": crit.targets(torch.arange(N)[rank::world]),
               "error": crit.topk_error(), "tau_e_state": crit.tau_e_state(),
               "reloaded": all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), state.values())),
               "ids": crit.store.held_ids(), "label_error": crit.mean_label_error(), "alpha": crit.alpha}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def worker_save(rank, world, store_dir, out_dir, mode):
    """Steps the global batches, then save_bank into out_dir/mode; a fresh loss of the same
    world loads it back (its state must equal the stepped one's)."""
    from dps_fast.distributed import load_bank, save_bank

    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world)
    try:
        make = lambda: DistributedDPSLoss(torch.arange(N) % C, C, mode=mode, top_k=K, c=5.0,  # noqa: E731
                                          eps=0.05, gamma=0.9, tau_e=1.0)
        crit = make()
        for z, idx in global_steps():
            crit(z[rank::world], idx[rank::world])
        save_bank(crit, os.path.join(out_dir, mode))
        again = make()
        load_bank(again, os.path.join(out_dir, mode))
        same = all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), crit.state_dict().values()))
        torch.save({"same": same}, os.path.join(out_dir, f"{mode}{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()

"""Process bodies for tests/test_distributed.py (importable by spawned children)."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dps_fast
from dps_fast import distributed as D

N, C, LOCAL_B, EPOCHS, GAMMA = 1200, 10, 40, 3, 0.9


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:N], dtype=torch.float32) / 16.0
    y = torch.tensor(d.target[:N], dtype=torch.int64)
    return x, y


def _epoch_order(epoch, n):
    return torch.randperm(n, generator=torch.Generator().manual_seed(100 + epoch))


def _finish():
    """Quiesce before tearing the group down: a rank leaving while gloo threads of
    the others are still busy can abort the process ('terminate called ...')."""
    dist.barrier()
    dist.destroy_process_group()


def _init(rank, world, store_dir):
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))


def _worker_train(rank, world, store_dir, mode, out_dir):
    torch.set_num_threads(1)
    _init(rank, world, store_dir)
    x, y = _digits()
    torch.manual_seed(0)
    model = torch.nn.Linear(64, C)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    crit = D.DistributedDPSLoss(y, C, c=5.0, gamma=GAMMA, mode=mode)
    losses = []
    for epoch in range(EPOCHS):
        order = _epoch_order(epoch, N)
        local = order[rank::world]
        for k in range(0, len(local), LOCAL_B):
            idx = local[k:k + LOCAL_B]
            loss = crit(ddp(x[idx]), idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            avg = loss.detach().clone()
            dist.all_reduce(avg)
            losses.append(float(avg) / world)
    bank = crit.full_bank()
    if rank == 0:
        torch.save({"bank": bank, "losses": torch.tensor(losses), "w": model.weight.detach()},
                   os.path.join(out_dir, f"{mode}-{world}.pt"))
    del ddp
    _finish()


def _single_process(world):
    x, y = _digits()
    torch.manual_seed(0)
    model = torch.nn.Linear(64, C)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    crit = dps_fast.DPSLoss(y, C, c=5.0, gamma=GAMMA)
    losses = []
    for epoch in range(EPOCHS):
        order = _epoch_order(epoch, N)
        locals_ = [order[r::world] for r in range(world)]
        for k in range(0, len(locals_[0]), LOCAL_B):
            idx = torch.cat([lo[k:k + LOCAL_B] for lo in locals_])
            loss = crit(model(x[idx]), idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return crit.alpha, torch.tensor(losses), model.weight.detach()




def _worker_padding(rank, world, store_dir, mode, out_dir, bank_dtype=torch.float32):
    _init(rank, world, store_dir)
    n = 10
    crit = D.DistributedDPSLoss(torch.arange(n) % 3, 3, c=2.0, eps=1.0, gamma=1.0, mode=mode, bank_dtype=bank_dtype)
    padded = torch.cat([torch.arange(n), torch.arange(n)[: (-n) % world]])  # DistributedSampler's padding
    local = padded[rank::world]
    pos = torch.arange(len(local))
    valid = D.padding_mask(n, world, rank, pos)
    # uneven batches: this rank's epoch in batches of 3 (the last one shorter)
    for k in range(0, len(local), 3):
        crit(torch.zeros(len(local[k:k + 3]), 3), local[k:k + 3], valid=valid[k:k + 3])
    bank = crit.full_bank()
    if rank == 0:
        torch.save(bank.float(), os.path.join(out_dir, "pad.pt"))
    _finish()


def _worker_save(rank, world, store_dir, mode, out_dir):
    _init(rank, world, store_dir)
    crit = D.DistributedDPSLoss(torch.arange(17) % 4, 4, mode=mode)
    idx = torch.arange(rank, 17, world)
    crit(torch.randn(len(idx), 4, generator=torch.Generator().manual_seed(rank)), idx)
    D.save_bank(crit, os.path.join(out_dir, "ckpt"))
    full = crit.full_bank()
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "saved_full.pt"))
    _finish()


def _worker_load(rank, world, store_dir, mode, out_dir):
    _init(rank, world, store_dir)
    crit = D.DistributedDPSLoss(torch.arange(17) % 4, 4, mode=mode)
    D.load_bank(crit, os.path.join(out_dir, "ckpt"))
    full = crit.full_bank()
    sd = crit.state_dict()
    crit2 = D.DistributedDPSLoss(torch.arange(17) % 4, 4, mode=mode)
    crit2.load_state_dict(sd)
    assert torch.equal(crit2.bank, crit.bank)
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "loaded_full.pt"))
    _finish()


def _worker_errors(rank, world, store_dir, mode, out_dir):
    _init(rank, world, store_dir)
    crit = D.DistributedDPSLoss(torch.arange(20) % 2, 2, mode=mode, timeout_s=30)
    before = crit.bank.clone()
    idx = torch.tensor([rank, 25]) if rank == 1 else torch.tensor([rank, 2 + rank])
    try:
        crit(torch.zeros(2, 2), idx)
        outcome = "no error"
    except IndexError as e:
        outcome = f"IndexError: {e}"
    unchanged = torch.equal(crit.bank, before)
    dup = torch.tensor([4, 4]) if rank == 0 else torch.tensor([rank + 10, rank + 12])
    try:
        crit(torch.zeros(2, 2), dup)
        outcome2 = "no error"
    except ValueError as e:
        outcome2 = f"ValueError: {e}"
    torch.save({"o": outcome, "o2": outcome2, "unchanged": unchanged and torch.equal(crit.bank, before)},
               os.path.join(out_dir, f"err{rank}.pt"))
    _finish()


"""The contract every bank kind keeps (docs/method.md, "Banks"), as one scenario that runs
in one process (local, host) or on every rank of a gloo group (replicated, sharded).

Each rank takes the ids ``global_batch[rank::world]`` of a global batch (uneven splits), and
the result is compared with one local DPSLoss that sees the whole global batch."""
import os
import time

import torch

import dps_fast

N, C, GB, GAMMA = 23, 5, 13, 0.9
LABELS = torch.arange(N) % C


def global_step_data(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randperm(N, generator=g)[:GB]
    z = torch.randn(GB, C, generator=g) * 2
    if step == 1:
        z[4, 2] = float("nan")  # a non-finite logit: its row is kept, its loss is NaN
    return idx, z


def make_loss(kind, world=1, **kw):
    kw.setdefault("tau_e", 1.0)  # the contract is about moving rows; tau_e="auto": tests/test_tau_e_auto.py
    if kind in ("replicated", "sharded"):
        return dps_fast.distributed.DistributedDPSLoss(LABELS, C, mode=kind, gamma=GAMMA, reduction="none",
                                                       timeout_s=30, **kw)
    return dps_fast.DPSLoss(LABELS, C, gamma=GAMMA, reduction="none", bank=kind, **kw)


def full(crit):
    return crit.full_bank().clone()


def training_steps(crit, rank, world):
    """Three steps; returns this rank's per-sample losses, targets and the final bank."""
    losses, targets = [], []
    for s in range(3):
        idx, z = global_step_data(s)
        mine = slice(rank, None, world)
        losses.append(crit(z[mine], idx[mine]).detach())
        targets.append(crit.targets(idx[mine]))
    return losses, targets, full(crit)


def reference_steps():
    ref = dps_fast.DPSLoss(LABELS, C, gamma=GAMMA, reduction="none", tau_e=1.0)
    losses, targets = [], []
    for s in range(3):
        idx, z = global_step_data(s)
        losses.append(ref(z, idx).detach())
        targets.append(ref.targets(idx))
    return losses, targets, ref.alpha.clone()


def eval_is_read_only(crit, rank, world):
    before = full(crit)
    crit.eval()
    idx, z = global_step_data(7)
    crit(z[rank::world], idx[rank::world])
    crit.train()
    return torch.equal(full(crit), before)


def padding_applied_once(crit, rank, world):
    """Rank 0's last id is repeated as padding (valid=False) on the last rank."""
    idx, z = global_step_data(8)
    mine, zm = idx[rank::world].clone(), z[rank::world].clone()
    valid = torch.ones(len(mine), dtype=torch.bool)
    if rank == world - 1:
        mine = torch.cat([mine, idx[:1]])
        zm = torch.cat([zm, torch.randn(1, C)])
        valid = torch.cat([valid, torch.tensor([False])])
    crit(zm, mine, valid=valid)
    return full(crit), idx, z


BAD_CASES = ["out_of_range", "duplicate", "cross_rank_duplicate", "classes", "index_length", "index_dtype",
             "logits_dtype", "valid_dtype", "device"]


def bad_input(case, rank, world):
    """(logits, index, valid) for this rank: bad on one rank only (the last; rank 1 for the
    cross-rank duplicate, which repeats rank 0's first id)."""
    idx, z = global_step_data(9)
    i, zz, valid = idx[rank::world].clone(), z[rank::world].clone(), None
    culprit = 1 if case == "cross_rank_duplicate" else world - 1
    if rank != culprit:
        return zz, i, valid
    if case == "cross_rank_duplicate":
        i[0] = idx[0]
    elif case == "out_of_range":
        i[0] = N + 2
    elif case == "duplicate":
        i[1] = i[0]
    elif case == "classes":
        zz = torch.randn(len(i), C + 1)
    elif case == "index_length":
        i = i[:-1]
    elif case == "index_dtype":
        i = i.float()
    elif case == "logits_dtype":
        zz = zz.long()
    elif case == "valid_dtype":
        valid = torch.ones(len(i), dtype=torch.int64)
    elif case == "device":
        zz = zz.to("meta")
    return zz, i, valid


def cases_for(world):
    return [c for c in BAD_CASES if world > 1 or c != "cross_rank_duplicate"]


def bad_inputs_raise_everywhere(crit, rank, world):
    """For each case: the exception type on this rank, the seconds it took, the bank unchanged?"""
    out = {}
    for case in cases_for(world):
        before = full(crit)
        zz, i, valid = bad_input(case, rank, world)
        t0 = time.perf_counter()
        try:
            crit(zz, i, valid=valid)
            got = "no error"
        except Exception as e:  # noqa: BLE001 - the type is what we compare
            got = type(e).__name__
        out[case] = (got, time.perf_counter() - t0, torch.equal(full(crit), before))
    return out


def run_contract(kind, rank, world):
    crit = make_loss(kind, world)
    losses, targets, bank = training_steps(crit, rank, world)
    res = {"losses": losses, "targets": targets, "bank": bank,
           "mean_label_error": crit.mean_label_error(chunk_rows=3),  # a collective: every rank, chunked
           "eval_read_only": eval_is_read_only(crit, rank, world)}
    res["bad"] = bad_inputs_raise_everywhere(crit, rank, world)
    res["pad_bank"], _, _ = padding_applied_once(crit, rank, world)
    return res


def contract_worker(rank, world, store_dir, kind, out_dir):
    torch.set_num_threads(1)
    from _dist_workers import _finish, _init

    _init(rank, world, store_dir)
    res = run_contract(kind, rank, world)
    torch.save(res, os.path.join(out_dir, f"contract-{rank}.pt"))
    _finish()

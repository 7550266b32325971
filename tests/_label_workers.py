"""Process bodies for the sharded tests of tests/test_label_issues.py (importable by spawned children)."""
import datetime
import os

import torch
import torch.distributed as dist

import dps_fast
from dps_fast import label_issues as L

N_ROWS, N_CLS = 301, 50  # C differs from every small tensor the ranks exchange
PRIOR = {"c": 100.0, "eps": 0.01, "gamma": 0.95}
SELECTIONS = {"estimated": {"prior_params": PRIOR}, "threshold": {"threshold": 0.3, "score": "label_error"},
              "rate": {"rate": 0.2, "score": "evidence"}}


def bank_and_labels():
    """The same bank in every process: 25% flipped labels, 30 visits of a model that
    leans towards the clean class."""
    g = torch.Generator().manual_seed(7)
    clean = torch.randint(0, N_CLS, (N_ROWS,), generator=g)
    flip = torch.rand(N_ROWS, generator=g) < 0.25
    noisy = torch.where(flip, (clean + torch.randint(1, N_CLS, (N_ROWS,), generator=g)) % N_CLS, clean)
    loss = dps_fast.DPSLoss(noisy, N_CLS, **PRIOR)
    for _ in range(30):
        loss(5.0 * torch.nn.functional.one_hot(clean, N_CLS).float() + torch.randn(N_ROWS, N_CLS, generator=g),
             torch.arange(N_ROWS))
    return loss.alpha.clone(), noisy


class BlockSource:
    """The interface a bank offers for sharded scoring: iter_rows over this rank's
    rows (here a contiguous block), the given labels, world and group."""

    def __init__(self, alpha, labels, rank, world):
        bounds = torch.linspace(0, len(labels), world + 1).round().long().tolist()
        self.lo, self.hi = bounds[rank], bounds[rank + 1]
        self.rows, self.given_labels, self.world, self.group = alpha[self.lo:self.hi], labels, world, None

    def iter_rows(self, chunk_rows):
        for i in range(0, len(self.rows), chunk_rows):
            yield torch.arange(self.lo + i, min(self.hi, self.lo + i + chunk_rows)), self.rows[i:i + chunk_rows]


def _record_collectives(log):
    """Wraps the collectives label_issues uses, to log the shape of every tensor sent."""
    for name in ("all_reduce", "all_gather"):
        orig = getattr(dist, name)

        def wrapped(*args, _orig=orig, _name=name, **kw):
            sent = args[0] if _name == "all_reduce" else args[1]
            log.append((_name, tuple(sent.shape)))
            return _orig(*args, **kw)

        setattr(dist, name, wrapped)


def worker_find(rank, world, tmp, kind):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        alpha, labels = bank_and_labels()
        if kind == "blocks":
            source = BlockSource(alpha, labels, rank, world)
        else:
            from dps_fast.distributed import DistributedDPSLoss

            source = DistributedDPSLoss(prior=alpha, mode=kind)

            def no_full_bank():
                raise AssertionError("find_label_issues gathered the whole bank")

            source.full_bank = no_full_bank
        log = []
        _record_collectives(log)
        out = {sel: L.find_label_issues(source, labels, chunk_rows=40, **kw) for sel, kw in SELECTIONS.items()}
        out["all_scores"] = L.all_scores(source, labels, chunk_rows=40)
        out["shapes"] = [s for _, s in log]
        out["calls"] = log
        out["largest"] = max(int(torch.tensor(s).prod()) for s in out["shapes"])
        torch.save(out, os.path.join(tmp, f"r{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()

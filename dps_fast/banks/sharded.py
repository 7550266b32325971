"""The sharded bank: rank r holds only the rows with ``id % world == r`` (stored at
``id // world``), built from the labels without the whole bank ever existing on one rank.

A step fetches the batch's rows from their owners (one all-to-all), runs the fused step
on them where the logits are, and sends the updated rows back to the owners (a second
all-to-all), who write them. Memory N*C/world per rank; traffic O(B*C) per rank."""
from __future__ import annotations

import torch

from .base import StepPlan
from .dist_base import DistributedBank
from .collective import Collective


def routes(plan, world: int, rank: int, device):
    """What this rank sends to each requester (the ids it owns, per requester), the order that
    groups this rank's batch by owner (batch order kept), and the two all-to-all counts."""
    serve = [ids.to(device) for ids in plan.extra["ids"]]
    serve = [ids[ids % world == rank] for ids in serve]
    owner = plan.index.to(device) % world
    order = torch.argsort(owner, stable=True)
    recv_counts = torch.bincount(owner, minlength=world).tolist()
    return serve, order, [len(s) for s in serve], recv_counts


def returned_rows(comm, plan, rows: torch.Tensor, world: int, rank: int, device):
    """The stepped ``rows`` (this rank's batch, in batch order) sent back to their owners: yields
    (local positions, rows) of the valid samples this rank owns, per requester."""
    serve, order, send_counts, recv_counts = plan.extra["routes"]
    back = comm.all_to_all_rows(rows[order], recv_counts, send_counts)
    for q, (ids, ok) in enumerate(zip(plan.extra["ids"], plan.extra["valid"])):
        ok = ok.to(device)[ids.to(device) % world == rank]
        start = sum(send_counts[:q])
        yield serve[q][ok] // world, back[start:start + send_counts[q]][ok]


def read_plan(comm, index: torch.Tensor, device) -> StepPlan:
    """The plan of a collective read of ``index`` (every rank calls it with its own ids):
    every rank learns every rank's ids, all valid, nothing written."""
    idx = index.to(device, torch.int64)
    counts = comm.agree(None, idx.numel(), device)
    ids = comm.all_gather_rows(idx, counts)
    every = [torch.ones_like(i, dtype=torch.bool) for i in ids]
    return StepPlan(None, idx, None, False, extra={"counts": counts, "ids": ids, "valid": every})


def gather_all(comm, mine: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Every rank's rows ``mine`` (ids rank, rank + W, ...) as the whole [N, ...] tensor, on every rank."""
    w = comm.world
    parts = comm.all_gather_rows(mine, [len(range(r, num_samples, w)) for r in range(w)])
    out = mine.new_empty((num_samples,) + tuple(mine.shape[1:]))
    for r, p in enumerate(parts):
        out[r::w] = p
    return out


class ShardedBank(DistributedBank):
    kind = "sharded"
    strided = True

    def __init__(self, rows: torch.Tensor, labels: torch.Tensor, num_samples: int, comm: Collective):
        """``rows``: this rank's rows (ids rank, rank + world, ...); ``labels``: the given labels of
        all N samples (8 bytes a sample), so that read-outs can index them by global id."""
        super().__init__(num_samples, rows.shape[1], comm)
        self.storage, self.labels = rows, labels

    def fetch(self, plan):
        serve, order, send_counts, recv_counts = routes(plan, self.world, self.rank, self.device)
        send = self.storage.index_select(0, torch.cat(serve) // self.world) if serve else self.storage[:0]
        got = self.comm.all_to_all_rows(send, send_counts, recv_counts)
        rows = torch.empty_like(got)
        rows[order] = got
        plan.extra["routes"] = (serve, order, send_counts, recv_counts)
        rows = rows.to(plan.device)
        return rows, torch.arange(rows.shape[0], device=rows.device)

    def commit(self, plan, rows):
        for at, got in returned_rows(self.comm, plan, rows.to(self.device), self.world, self.rank, self.device):
            self.storage.index_copy_(0, at, got)

    def rows(self, index):
        """The rows of ``index`` (a collective: every rank calls it with its own ids)."""
        return self.fetch(read_plan(self.comm, index, self.device))[0]

    def full(self):
        """The whole bank [N, C] on every rank: an explicit collective of N*C elements."""
        return gather_all(self.comm, self.storage, self.num_samples)

    def held_ids(self):
        return torch.arange(self.rank, self.num_samples, self.world)

    def strided_rows(self):
        return self.storage

    def layout(self):
        return torch.tensor([self.world, self.rank, self.num_samples, self.num_classes, 1])

"""The sharded bank: rank r holds only the rows with ``id % world == r`` (stored at
``id // world``), built from the labels without the whole bank ever existing on one rank.

A step fetches the batch's rows from their owners (one all-to-all), runs the fused step
on them where the logits are, and sends the updated rows back to the owners (a second
all-to-all), who write them. Memory N*C/world per rank; traffic O(B*C) per rank."""
from __future__ import annotations

import torch

from .dist_base import DistributedBank
from .collective import Collective


class ShardedBank(DistributedBank):
    kind = "sharded"
    strided = True

    def __init__(self, rows: torch.Tensor, labels: torch.Tensor, num_samples: int, comm: Collective):
        """``rows``: this rank's rows (ids rank, rank + world, ...); ``labels``: the given labels of
        all N samples (8 bytes a sample), so that read-outs can index them by global id."""
        super().__init__(num_samples, rows.shape[1], comm)
        self.storage, self.labels = rows, labels

    def _routes(self, plan):
        """What this rank sends to each requester, and receives from each owner."""
        w, r = self.world, self.rank
        serve = [ids.to(self.device) for ids in plan.extra["ids"]]
        serve = [ids[ids % w == r] for ids in serve]           # requester q's ids that this rank owns
        mine = plan.index.to(self.device)
        owner = mine % w
        order = torch.argsort(owner, stable=True)              # my ids grouped by owner, batch order kept
        recv_counts = torch.bincount(owner, minlength=w).tolist()
        return serve, order, [len(s) for s in serve], recv_counts

    def fetch(self, plan):
        serve, order, send_counts, recv_counts = self._routes(plan)
        send = self.storage.index_select(0, torch.cat(serve) // self.world) if serve else self.storage[:0]
        got = self.comm.all_to_all_rows(send, send_counts, recv_counts)
        rows = torch.empty_like(got)
        rows[order] = got
        plan.extra["routes"] = (serve, order, send_counts, recv_counts)
        rows = rows.to(plan.device)
        return rows, torch.arange(rows.shape[0], device=rows.device)

    def commit(self, plan, rows):
        serve, order, send_counts, recv_counts = plan.extra["routes"]
        back = self.comm.all_to_all_rows(rows.to(self.device)[order], recv_counts, send_counts)
        w, r = self.world, self.rank
        for q, (ids, ok) in enumerate(zip(plan.extra["ids"], plan.extra["valid"])):
            ok = ok.to(self.device)[ids.to(self.device) % w == r]
            start = sum(send_counts[:q])
            got = back[start:start + send_counts[q]]
            self.storage.index_copy_(0, serve[q][ok] // w, got[ok])

    def rows(self, index):
        """The rows of ``index`` (a collective: every rank calls it with its own ids)."""
        from .base import StepPlan

        idx = index.to(self.device, torch.int64)
        counts = self.comm.agree(None, idx.numel(), self.device)
        ids = self.comm.all_gather_rows(idx, counts)
        every = [torch.ones_like(i, dtype=torch.bool) for i in ids]
        plan = StepPlan(None, idx, None, False, extra={"counts": counts, "ids": ids, "valid": every})
        return self.fetch(plan)[0]

    def full(self):
        """The whole bank [N, C] on every rank: an explicit collective of N*C elements."""
        n, w = self.num_samples, self.world
        counts = [len(range(r, n, w)) for r in range(w)]
        parts = self.comm.all_gather_rows(self.storage, counts)
        out = self.storage.new_empty(n, self.num_classes)
        for r, p in enumerate(parts):
            out[r::w] = p
        return out

    def held_ids(self):
        return torch.arange(self.rank, self.num_samples, self.world)

    def strided_rows(self):
        return self.storage

    def layout(self):
        return torch.tensor([self.world, self.rank, self.num_samples, self.num_classes, 1])

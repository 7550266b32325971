"""The replicated bank: every rank holds all N rows. Each rank runs the fused step on its
own batch's rows, then the ranks all-gather the updated rows and every rank writes all
of them, so the replicas stay identical."""
from __future__ import annotations

import torch

from .dist_base import DistributedBank
from .collective import Collective


class ReplicatedBank(DistributedBank):
    kind = "replicated"

    def __init__(self, alpha: torch.Tensor, labels: torch.Tensor, comm: Collective):
        super().__init__(alpha.shape[0], alpha.shape[1], comm)
        self.storage, self.labels = alpha, labels

    def fetch(self, plan):
        rows = self.storage.index_select(0, plan.index.to(self.device))
        rows = rows.to(plan.device)
        return rows, torch.arange(rows.shape[0], device=rows.device)

    def commit(self, plan, rows):
        every = self.comm.all_gather_rows(rows.to(self.device), plan.extra["counts"])
        for ids, ok, got in zip(plan.extra["ids"], plan.extra["valid"], every):
            self.storage.index_copy_(0, ids[ok], got[ok])

    def rows(self, index):
        return self.storage.index_select(0, index.to(self.device, torch.int64))

    def full(self):
        return self.storage.clone()

    def held_ids(self):
        return torch.arange(self.num_samples)

    def iter_rows(self, chunk_rows: int = 65536):
        ids, rows = torch.arange(self.rank, self.num_samples, self.world), self.storage[self.rank::self.world]
        for k in range(0, rows.shape[0], chunk_rows):
            yield ids[k:k + chunk_rows], rows[k:k + chunk_rows]

    def strided_rows(self):
        return self.storage[self.rank::self.world]

    def layout(self):
        """Any rank's replica loads on any rank: only the bank's shape must match."""
        return torch.tensor([self.num_samples, self.num_classes, 0])

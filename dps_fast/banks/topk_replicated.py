"""The top-k bank replicated over the ranks of a process group (``DistributedDPSLoss(...,
mode="replicated", top_k=k)``, docs/method.md §12): every rank holds all N rows in top-k form
(200 bytes a row at k = 32: 2.8 GB for ImageNet-21k fits beside the model). A step validates
and agrees as every distributed bank does (dist_base.DistributedBank.begin), runs the top-k
reference step on this rank's rows, then all-gathers the updated rows of every rank as
B * (2k + 2) numbers (ids, values, rest, bound), not B * C.
"""
from __future__ import annotations

import torch

from .. import topk as T
from .collective import Collective
from .dist_base import DistributedBank
from .topk_local import LocalTopKBank
from .topk_saves import TopKSaves, pack, unpack


class ReplicatedTopKBank(TopKSaves, DistributedBank):
    """All N rows on every rank, in top-k form (a LocalTopKBank per rank, kept identical)."""

    kind = "replicated"
    optional_state = LocalTopKBank.optional_state

    def __init__(self, rows: T.TopKRows, labels: torch.Tensor, comm: Collective):
        super().__init__(rows.ids.shape[0], rows.num_classes, comm)
        self.local = LocalTopKBank(rows, labels)

    # the rows live in self.local; these make the base class's plumbing see them
    labels = property(lambda self: self.local.labels, lambda self, v: setattr(self.local, "labels", v))
    dtype = property(lambda self: self.local.dtype)
    device = property(lambda self: self.local.device)
    storage = property(lambda self: self.local.storage)  # the implied dense bank: N * C values

    def step(self, logits, index, valid, update: bool, cfg, extra_check=None):
        plan = self.begin(logits, index, valid, update, cfg, extra_check)
        loss, rows = self.local.stepped_rows(plan, cfg)
        if plan.update:
            self._share(rows, plan)
        return loss, T.densify(rows.ids, rows.vals, rows.rest, self.num_classes)

    def _share(self, rows: T.TopKRows, plan) -> None:
        """Every rank's updated rows to every rank, packed (topk_saves.pack: ids exact),
        written where the sample was valid."""
        packed = pack(rows).to(self.device)
        for ids, ok, got in zip(plan.extra["ids"], plan.extra["valid"],
                                self.comm.all_gather_rows(packed, plan.extra["counts"])):
            self.local.put(ids[ok], unpack(got[ok], self.local.k, self.num_classes, self.device))

    # ------------------------------------------------------------------ read-outs
    def error(self) -> dict:
        return self.local.error()

    def rows(self, index):
        return self.local.rows(index)

    def full(self):
        return self.local.full()

    def held_ids(self):
        return torch.arange(self.num_samples)

    def iter_rows(self, chunk_rows: int = 65536):
        """This rank's share of the read-outs (ids rank, rank + W, ...), implied dense rows."""
        ids = torch.arange(self.rank, self.num_samples, self.world)
        for k in range(0, ids.shape[0], chunk_rows):
            yield ids[k:k + chunk_rows], self.local.rows(ids[k:k + chunk_rows])

    # ------------------------------------------------------------------ module plumbing
    def move(self, fn):
        self.local.move(fn)

    def convert(self, dtype):
        self.local.convert(dtype)

    def state(self):
        return self.local.state()

    # load_state: DistributedBank's (verify on every rank, agree, then write), with these two
    def _verified(self, state: dict) -> dict:
        return self.local._verified(state)

    def _write(self, staged: dict) -> None:
        self.local.write(staged)

    def saved_positions(self) -> torch.Tensor:
        """Rows rank, rank + W, ...: the replicas split a save between them."""
        return torch.arange(self.rank, self.num_samples, self.world)

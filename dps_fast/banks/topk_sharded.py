"""The top-k bank sharded over the ranks of a process group (``DistributedDPSLoss(...,
mode="sharded", top_k=k)``, docs/method.md §12): rank r holds the rows with ``id % world == r``
in top-k form (a LocalTopKBank of those rows, at ``id // world``). A step fetches the batch's
rows from their owners and sends the stepped rows back (two all-to-alls, as the dense sharded
bank), each row as 2k + 2 numbers (ids, values, rest, bound), not C. save_bank / load_bank:
topk_saves.py.
"""
from __future__ import annotations

import torch

from .. import topk as T
from . import state as bank_state
from .base import StepPlan
from .collective import Collective
from .dist_base import DistributedBank
from .sharded import gather_all, read_plan, returned_rows, routes
from .topk_local import LocalTopKBank, compressed_label_share, row_tv_bound, run_step
from .topk_saves import TopKSaves, pack, unpack


class ShardedTopKBank(TopKSaves, DistributedBank):
    """This rank's rows (ids rank, rank + W, ...) in top-k form; the given labels of all N."""

    kind = "sharded"
    strided = True
    optional_state = LocalTopKBank.optional_state

    def __init__(self, rows: T.TopKRows, labels: torch.Tensor, comm: Collective):
        """``rows``: this rank's rows; ``labels``: the given labels of all N samples."""
        super().__init__(labels.shape[0], rows.num_classes, comm)
        self.local = LocalTopKBank(rows, labels[comm.rank::comm.world].clone())
        self.labels = labels
        self._stepped = None  # (index, rows) of the last step: tau_e="auto" reads its label shares

    dtype = property(lambda self: self.local.dtype)
    device = property(lambda self: self.local.device)
    k = property(lambda self: self.local.k)
    storage = property(lambda self: self.local.storage)  # this rank's rows, densified (``crit.alpha``)

    # ------------------------------------------------------------------ the step
    def step(self, logits, index, valid, update: bool, cfg, extra_check=None):
        """DistributedBank's checks and agreement, this rank's rows fetched from their owners,
        the top-k step where the logits are, the stepped rows back to their owners."""
        plan = self.begin(logits, index, valid, update, cfg, extra_check)
        if update:
            self.local.refuse_recompute()
        rows = self._fetch(plan)
        loss = run_step(plan, rows, cfg, grad_cache=self.local.grad_cache)
        if plan.update:
            for at, got in returned_rows(self.comm, plan, pack(rows).to(self.device), self.world, self.rank,
                                         self.device):
                self.local.put(at, unpack(got, self.k, self.num_classes, self.device))
        self._stepped = (plan.index, rows)
        if valid is None and extra_check is None:
            return loss, None
        # padding, or a contrastive term: the batch's stepped rows (not the bank's, not a collective)
        return loss, T.densify(rows.ids, rows.vals, rows.rest, self.num_classes)

    def _fetch(self, plan: StepPlan) -> T.TopKRows:
        serve, order, send_counts, recv_counts = routes(plan, self.world, self.rank, self.device)
        at = torch.cat(serve) // self.world if serve else torch.zeros(0, dtype=torch.int64, device=self.device)
        got = self.comm.all_to_all_rows(pack(self.local.take(at)), send_counts, recv_counts)
        packed = torch.empty_like(got)
        packed[order] = got
        plan.extra["routes"] = (serve, order, send_counts, recv_counts)
        return unpack(packed, self.k, self.num_classes, plan.device)

    def label_share_sum(self, index, valid, rows):
        """From the last step's compressed rows (their owners may be other ranks)."""
        at, stepped = self._stepped
        lab = self.labels.index_select(0, at.to(self.labels.device)).to(stepped.ids.device)
        return compressed_label_share(stepped.ids, stepped.vals, stepped.rest, lab, self.num_classes, valid)

    # ------------------------------------------------------------------ read-outs
    def rows(self, index):
        """The implied dense rows of ``index`` (a collective: every rank calls it with its own ids)."""
        rows = self._fetch(read_plan(self.comm, index, self.device))
        return T.densify(rows.ids, rows.vals, rows.rest, self.num_classes)

    def full(self):
        """The implied dense bank [N, C] on every rank: N * C values (small banks only)."""
        return gather_all(self.comm, self.local.storage, self.num_samples)

    def held_ids(self):
        return torch.arange(self.rank, self.num_samples, self.world)

    def iter_rows(self, chunk_rows: int = 65536):
        """(global ids, implied dense rows) of this rank's rows, a chunk at a time."""
        for (_, rows), k in zip(self.local.iter_rows(chunk_rows), range(0, self.local.num_samples, chunk_rows)):
            yield self.held_ids()[k:k + rows.shape[0]], rows

    def error(self) -> dict:
        """LocalTopKBank.error over every rank's rows (a collective)."""
        tv = row_tv_bound(self.local.bound, self.local.vals, self.local.rest)
        hit = tv > 0
        mine = torch.stack([tv.sum(), tv.new_tensor(tv.numel()), hit.sum().double(), tv[hit].sum(),
                            tv.max() if tv.numel() else tv.new_tensor(0.0)])[None]
        every = self.comm.gather_rows(mine.to(self.device))
        total, n, hits, hit_sum = (float(v) for v in every[:, :4].sum(0))
        return {"mean_tv_bound": total / n if n else 0.0, "max_tv_bound": float(every[:, 4].max()),
                "rows_with_error": int(hits), "mean_tv_bound_of_those": hit_sum / hits if hits else 0.0}

    # ------------------------------------------------------------------ module plumbing
    def move(self, fn):
        self.local.move(fn)
        self.labels = bank_state.keep_dtype(fn, self.labels)

    def convert(self, dtype):
        self.local.convert(dtype)

    def layout(self):
        return torch.tensor([self.world, self.rank, self.num_samples, self.num_classes, self.k])

    def state(self):
        state = {k: v for k, v in self.local.state().items() if k != "given_labels"}
        return {**state, "bank_layout": self.layout(), "given_labels": self.labels}

    def _verified(self, state: dict) -> dict:
        got = state.get("bank_layout", self.layout())
        got = got.tolist() if isinstance(got, torch.Tensor) else got
        if got != self.layout().tolist():
            raise ValueError(f"bank layout {got} does not match this process's {self.layout().tolist()}")
        rows = {k: v for k, v in state.items() if k.startswith("topk_")}
        if "given_labels" in state and not rows:
            raise ValueError("given_labels: saved without the rows (topk_ids, topk_vals, topk_rest); the labels "
                             "load only with the bank they belong to")
        staged = self.local._verified(rows)
        if "given_labels" in state:
            staged["all_labels"] = bank_state.check_labels(state["given_labels"], self.num_samples, self.num_classes)
        return staged

    def _write(self, staged: dict) -> None:
        labels = staged.pop("all_labels", None)
        self.local.write(staged)
        if labels is not None:
            with torch.no_grad():
                self.labels.copy_(labels)
                self.local.labels.copy_(labels[self.rank::self.world])

    def saved_positions(self) -> torch.Tensor:
        return torch.arange(self.local.num_samples)

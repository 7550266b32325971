"""The top-k bank on one process (``DPSLoss(..., top_k=k)``, docs/method.md §12): each row keeps
k class ids, their concentrations and the mass of the other C - k classes, B * k values a
step instead of B * C. The step is the top-k reference step (dps_fast/topk.py; the fused
kernels are issue 26's next step), on the batch's gathered rows; every policy of the dense
banks holds (checks before any write, eval never writes, non-finite rows keep their state,
``valid=False`` rows never write).

Read-outs see the implied dense rows (``rows``, ``iter_rows``): label issues, soft labels and
``posterior()`` work unchanged, a chunk at a time; ``storage`` (``crit.alpha``) densifies the
whole bank (N * C values: use ``iter_rows`` at scale).
"""
from __future__ import annotations

import dataclasses

import torch

from .. import topk as T
from ..ops._common import GradCache, in_backward_recompute
from . import state as bank_state
from .base import Bank, StepPlan, valid_sum


def id_dtype(num_classes: int) -> torch.dtype:
    """int16 ids up to 32,767 classes, else int32 (docs/method.md §12)."""
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32


def compressed_label_share(ids, vals, rest, labels, num_classes: int, valid):
    """Bank.label_share_sum of compressed rows: the label's value where it is kept, else the
    uniform level rest / (C - k), over the row's mass vals.sum + rest."""
    vals, rest = vals.float(), rest.float()
    hit = ids.to(torch.int64) == labels.to(ids.device, torch.int64)[:, None]
    on_label = torch.where(hit.any(1), torch.where(hit, vals, 0).sum(1), rest / (num_classes - ids.shape[1]))
    return valid_sum(on_label / (vals.sum(1) + rest), valid)



def row_tv_bound(bound: torch.Tensor, vals: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """Per row, float64: the bound on the total-variation distance between the row's target and
    a dense bank's, bound / (2 * row mass), at most 1 (no TV exceeds 1; docs/method.md §12)."""
    return (bound / (2 * (vals.float().sum(1) + rest))).double().clamp(max=1.0)


def run_step(plan: StepPlan, rows: T.TopKRows, cfg, skip: torch.Tensor | None = None,
             grad_cache: GradCache | None = None):
    """The top-k step on the batch's gathered ``rows`` (in place when ``plan.update``): a fused
    kernel (CPU, Triton) where one applies, else the reference. Every top-k bank kind steps through here.
    Rows where ``skip`` is set keep their state and get a NaN loss (docs/method.md §9); a fused
    kernel writes the gradient into ``grad_cache``'s buffer (the bank's)."""
    local = torch.arange(rows.ids.shape[0], device=rows.ids.device)
    if skip is not None:
        local = torch.where(skip.to(local.device), -1, local)
    fused = T.fused_backend(plan.logits, rows, cfg.backend)
    args = (plan.logits, local, rows, cfg.gamma, cfg.tau_e, cfg.target, cfg.reduction)
    if fused is None:
        return T.reference_step(*args, update=plan.update)
    return T.fused_step(*args, update=plan.update, backend=fused, grad_cache=grad_cache)


class LocalTopKBank(Bank):
    """ids [N, k] (int16 / int32), vals [N, k] (float32, bfloat16 or float16) and rest [N]
    (float32) on one device."""

    kind = "local"
    optional_state = ("given_labels", "topk_bound")  # state_dict keys a load may lack

    def __init__(self, rows: T.TopKRows, labels: torch.Tensor):
        super().__init__(rows.ids.shape[0], rows.num_classes)
        self.ids = rows.ids.to(id_dtype(rows.num_classes))  # no copy when built in that dtype
        self.vals, self.rest, self.labels = rows.vals, rows.rest, labels
        self.bound = rows.bound if rows.bound is not None else torch.zeros_like(rows.rest)

    @property
    def k(self) -> int:
        """Classes kept per row."""
        return self.ids.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.vals.dtype

    @property
    def device(self) -> torch.device:
        return self.vals.device

    @property
    def storage(self) -> torch.Tensor:
        """The implied dense bank [N, C]: N * C values (use ``iter_rows`` at scale)."""
        return T.densify(self.ids, self.vals, self.rest, self.num_classes)

    # ------------------------------------------------------------------ the step
    def begin(self, logits, index, valid, update, cfg, extra_check) -> StepPlan:
        idx, name = self.check_local(logits, index, valid, cfg, extra_check)
        if self.device != logits.device:
            raise ValueError(f"the bank is on {self.device} but the logits are on {logits.device}: move the loss "
                             f"with .to(device)")
        if update:
            self.refuse_recompute()
        return StepPlan(logits, idx, valid, update, "reference", gathered=True)

    @staticmethod
    def refuse_recompute() -> None:
        if in_backward_recompute():
            raise NotImplementedError("dps_fast: a top-k bank cannot be stepped inside activation checkpointing "
                                      "yet; compute the loss outside the checkpointed function")

    def step(self, logits, index, valid, update: bool, cfg, extra_check=None):
        """The base class's plan (every check before any write), the top-k reference step on
        the batch's gathered rows, then the rows written back (valid rows only)."""
        plan = self.begin(logits, index, valid, update, cfg, extra_check)
        loss, rows = self.stepped_rows(plan, cfg)
        if plan.update:
            self.write_rows(plan, rows)
        if plan.valid is None:  # the bank holds the stepped rows: a contrastive term reads them there
            return loss, None    # (densifying B rows here cost ~25 ms a step at [1024, 21,841])
        return loss, T.densify(rows.ids, rows.vals, rows.rest, self.num_classes)

    def take(self, at: torch.Tensor) -> T.TopKRows:
        """The rows at local positions ``at`` (copies, int64 ids)."""
        return T.TopKRows(self.ids[at].to(torch.int64), self.vals[at], self.rest[at], self.num_classes, self.bound[at])

    def put(self, at: torch.Tensor, rows: T.TopKRows) -> None:
        """Writes ``rows`` at local positions ``at``."""
        at = at.to(self.device)
        self.ids[at] = rows.ids.to(self.device, self.ids.dtype)
        self.vals[at] = rows.vals.to(self.device, self.vals.dtype)  # a 16-bit bank rounds here
        self.rest[at], self.bound[at] = rows.rest.to(self.device), rows.bound.to(self.device)

    def write_rows(self, plan: StepPlan, rows) -> None:
        """Writes the stepped rows of the valid samples into the bank (on the bank's device)."""
        if plan.extra and "outside" in plan.extra:
            plan, rows = self._outside_as_copies(plan, rows)
        if plan.valid is None:
            return self.put(plan.index, rows)
        sel = plan.valid.to(rows.ids.device)
        self.put(plan.index[plan.valid], T.TopKRows(rows.ids[sel], rows.vals[sel], rows.rest[sel], self.num_classes,
                                                    rows.bound[sel]))

    def _outside_as_copies(self, plan: StepPlan, rows):
        """validate=False: each batch row whose id was outside the bank (skipped by the step) is
        written as a copy of the first row inside, at that row's position: the same bytes twice,
        so no write depends on order, and no host sync (CUDA graphs). A batch with no row inside
        writes each skipped row's unchanged copy back where it was read."""
        outside = plan.extra["outside"]
        first = torch.argmax((~outside).to(torch.int8))
        src = torch.where(outside, first, torch.arange(outside.shape[0], device=outside.device))
        pick = lambda t: t.index_select(0, src.to(t.device))  # noqa: E731
        rows = T.TopKRows(pick(rows.ids), pick(rows.vals), pick(rows.rest), self.num_classes, pick(rows.bound))
        valid = None if plan.valid is None else pick(plan.valid)
        return dataclasses.replace(plan, index=pick(plan.index), valid=valid), rows

    def stepped_rows(self, plan: StepPlan, cfg):
        """(loss, rows): the top-k step (the fused CPU kernel where it applies, else the
        reference) on a copy of the plan's rows, on the logits' device, which it updates when
        ``plan.update`` (the bank itself is written by the caller)."""
        outside = None
        if not cfg.validate:  # unchecked ids: one outside the bank is skipped, as in the dense bank
            outside = (plan.index < 0) | (plan.index >= self.num_samples)
            plan.index = torch.where(outside, 0, plan.index)  # read row 0; write_rows never writes it back
            plan.extra = {**(plan.extra or {}), "outside": outside}
        at, dev = plan.index.to(self.device), plan.device
        rows = T.TopKRows(self.ids[at].to(dev, torch.int64), self.vals[at].to(dev, self.rest.dtype),
                          self.rest[at].to(dev), self.num_classes, self.bound[at].to(dev))  # the step in float32
        return run_step(plan, rows, cfg, skip=outside, grad_cache=self.grad_cache), rows

    # ------------------------------------------------------------------ read-outs
    def error(self) -> dict:
        """The bank's own error (docs/method.md §12): per row, the bound on the total-variation
        distance between its target and a dense bank's given the same evidence (row_tv_bound);
        its mean and max over all rows and over the rows whose bound is > 0."""
        tv = row_tv_bound(self.bound, self.vals, self.rest)
        hit = tv > 0
        return {"mean_tv_bound": float(tv.mean()) if tv.numel() else 0.0,
                "max_tv_bound": float(tv.max()) if tv.numel() else 0.0,
                "rows_with_error": int(hit.sum()),
                "mean_tv_bound_of_those": float(tv[hit].mean()) if bool(hit.any()) else 0.0}

    def held_ids(self) -> torch.Tensor:
        return torch.arange(self.num_samples)

    def iter_compressed(self, chunk_rows: int = 65536):
        """(ids, class ids [n, k] int64, values [n, k], rest [n]) a chunk at a time, as stored:
        what export_soft_labels reads instead of the implied dense rows."""
        for k in range(0, self.num_samples, chunk_rows):
            end = min(k + chunk_rows, self.num_samples)
            yield torch.arange(k, end), self.ids[k:end].to(torch.int64), self.vals[k:end], self.rest[k:end]

    def iter_rows(self, chunk_rows: int = 65536):
        """(ids, implied dense rows) a chunk at a time: chunk_rows * C values of scratch."""
        for k in range(0, self.num_samples, chunk_rows):
            ids = torch.arange(k, min(k + chunk_rows, self.num_samples))
            yield ids, self.rows(ids)

    def label_share_sum(self, index, valid, rows):
        """The base class's statistic, read from the compressed rows (no densified copy)."""
        if rows is not None:
            return super().label_share_sum(index, valid, rows)
        idx = index.to(self.device, torch.int64).clamp(0, self.num_samples - 1)
        return compressed_label_share(self.ids[idx], self.vals[idx], self.rest[idx], self.labels[idx],
                                      self.num_classes, valid)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        idx = index.to(self.device, torch.int64)
        return T.densify(self.ids[idx], self.vals[idx], self.rest[idx], self.num_classes)

    def full(self) -> torch.Tensor:
        return self.storage

    # ------------------------------------------------------------------ module plumbing
    def move(self, fn) -> None:
        """Module casts move the rows and labels but keep their dtypes (banks/state.py)."""
        for name in ("ids", "vals", "rest", "bound", "labels"):
            setattr(self, name, bank_state.keep_dtype(fn, getattr(self, name)))

    def convert(self, dtype) -> None:
        raise NotImplementedError("a top-k bank keeps the values dtype it was built with (bank_dtype=: float32, "
                                  "bfloat16 or float16)")

    def state(self) -> dict:
        return {"topk_ids": self.ids, "topk_vals": self.vals, "topk_rest": self.rest, "topk_bound": self.bound,
                "given_labels": self.labels}

    def load_state(self, state: dict, errors: list) -> None:
        """Verifies every tensor of ``state`` before writing any (docs/method.md §8.1)."""
        try:
            staged = self._verified(state)
        except bank_state.LOAD_ERRORS as e:
            errors.append(str(e))
            return
        self.write(staged)

    def write(self, staged: dict) -> None:
        """Writes verified tensors (``_verified``) in place, without grad."""
        with torch.no_grad():
            for name, value in staged.items():
                getattr(self, name).copy_(value)

    def _verified(self, state: dict) -> dict:
        keys = ("topk_ids", "topk_vals", "topk_rest")
        present = [k for k in keys if k in state]
        if present and len(present) != len(keys):
            raise ValueError(f"a top-k bank loads {', '.join(keys)} together; the state has only {present}")
        if "given_labels" in state and not present:
            raise ValueError("given_labels: saved without the rows (topk_ids, topk_vals, topk_rest); the labels "
                             "load only with the bank they belong to")
        out = {}
        if present:
            out["ids"] = self._checked_ids(state["topk_ids"])
            out["vals"] = bank_state.check_rows(state["topk_vals"], self.vals, "topk_vals")
            rest = state["topk_rest"]
            if not torch.is_tensor(rest) or not rest.is_floating_point() or tuple(rest.shape) != (self.num_samples,):
                raise ValueError(f"topk_rest: a floating tensor of shape [{self.num_samples}] expected")
            as_stored = rest.detach().to(self.rest.dtype)
            if not bool((torch.isfinite(as_stored) & (as_stored >= 0)).all()):
                raise ValueError(f"topk_rest must be finite and >= 0 in {self.rest.dtype}")
            out["rest"] = rest
        if "topk_bound" in state:  # optional: the bound restarts at 0 without it
            bound = state["topk_bound"]
            if not torch.is_tensor(bound) or not bound.is_floating_point() or tuple(bound.shape) != (self.num_samples,) \
                    or not bool((torch.isfinite(bound) & (bound >= 0)).all()):
                raise ValueError(f"topk_bound: a finite tensor >= 0 of shape [{self.num_samples}] expected")
            out["bound"] = bound
        if "given_labels" in state:
            out["labels"] = bank_state.check_labels(state["given_labels"], self.num_samples, self.num_classes)
        return out

    def _checked_ids(self, ids) -> torch.Tensor:
        if not torch.is_tensor(ids) or ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError("topk_ids: an integer tensor of class ids expected")
        if tuple(ids.shape) != tuple(self.ids.shape):
            raise ValueError(f"topk_ids: saved shape {tuple(ids.shape)}, this bank is {tuple(self.ids.shape)}")
        for r in range(0, ids.shape[0], 1 << 16):  # a block of rows at a time: no int64 copy of the bank
            block = ids[r:r + (1 << 16)].detach().to(torch.int64)
            if not (0 <= int(block.min()) and int(block.max()) < self.num_classes):
                raise ValueError(f"topk_ids: class ids must lie in [0, {self.num_classes})")
            if self.k > 1 and bool((torch.sort(block, 1).values.diff(dim=1) == 0).any()):
                raise ValueError("topk_ids: a row holds the same class twice")
        return ids

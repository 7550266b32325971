"""The shared base of every bank kind: the one DPS step, and the policies it keeps.

A bank holds the posterior rows ``alpha`` [N, C] (docs/method.md, "What one training
step computes"), somewhere: in place on the training device (local), in pinned host
memory (host), on every rank (replicated) or spread over the ranks (sharded). Every kind
runs the same step, :func:`dps_fast.functional.dps_cross_entropy`, which is the only
place outside the reference where the update is computed. A bank kind only moves rows:

1. ``begin``: validate the whole call (every rank agrees on the outcome) and plan it;
2. ``fetch``: bring the batch's rows to the step, as a [B, C] buffer (or the bank itself);
3. the fused step, on those rows;
4. ``commit``: take the updated rows back (skipped in eval mode).

So the policies live here once: eval (``update=False``) never writes; a sample with
non-finite logits keeps its row (the step leaves it untouched, and commit writes back
what it read); every check runs before the first write, on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _dispatch
from .. import _validate
from ..ops._common import GradCache, in_backward_recompute
from ..ops.dps_cross_entropy import run as run_step


@dataclass(frozen=True)
class StepConfig:
    """The parameters of the DPS step (docs/method.md), validated once."""
    gamma: float = 0.95
    tau_e: float = 1.0
    target: str = "posterior"
    reduction: str = "mean"
    backend: str | None = None
    validate: bool = True

    def __post_init__(self):
        object.__setattr__(self, "gamma", _validate.gamma_value(self.gamma))
        object.__setattr__(self, "tau_e", _validate.evidence_temperature(self.tau_e))
        _validate.target_name(self.target)
        _validate.reduction_code(self.reduction)
        _dispatch.backend_name(self.backend)


@dataclass
class StepPlan:
    """What ``begin`` learned about one call: the local batch, and what the bank kind needs."""
    logits: torch.Tensor | None
    index: torch.Tensor          # int64, on the logits' device
    valid: torch.Tensor | None   # bool [B] or None (all valid)
    update: bool
    backend: str = "reference"  # the resolved backend of the step
    gathered: bool = True      # the step runs on a fetched copy of the rows, not on the bank in place
    extra: dict | None = None

    @property
    def device(self) -> torch.device:
        """Where the step runs: the logits' device (the index's, for a read of rows)."""
        return (self.logits if self.logits is not None else self.index).device


class Bank:
    """Base of the bank kinds. Subclasses set ``num_samples``, ``num_classes`` and the
    storage, and implement ``begin`` / ``fetch`` / ``commit`` and the read-outs."""

    kind = "base"

    grad_cache: GradCache | None = None  # per instance (below); None: a bank pickled before it existed

    def __init__(self, num_samples: int, num_classes: int):
        self.num_samples, self.num_classes = int(num_samples), int(num_classes)
        self.grad_cache = GradCache()  # the fused step's gradient buffer, reused (ops/_common.py)

    # ------------------------------------------------------------------ the one step
    def step(self, logits, index, valid, update: bool, cfg: StepConfig, extra_check=None):
        """One DPS step on this bank. Returns (loss, rows): ``rows`` are the batch's bank
        rows after the step ([B, C], bank dtype), for read-outs of the batch."""
        plan = self.begin(logits, index, valid, update, cfg, extra_check)
        rows, rows_index = self.fetch(plan)
        # begin() has validated everything; under activation checkpointing the step itself
        # turns a recomputed forward into a read (docs/method.md §9)
        loss = run_step(plan.logits, rows_index, rows, cfg.gamma, cfg.tau_e, cfg.target == "posterior",
                        cfg.reduction, plan.update, plan.backend, cfg.backend, grad_cache=self.grad_cache)
        if plan.update and not in_backward_recompute():
            self.commit(plan, rows)
        return loss, (rows if plan.gathered else None)

    def check_local(self, logits, index, valid, cfg: StepConfig, extra_check=None):
        """Every check of one call that this process can do alone; raises on bad input.
        Returns (the index as int64 on the logits' device, the resolved backend)."""
        v, b, c = _validate.logits_tensor(logits)
        _validate.index_tensor(index, b)
        if c != self.num_classes:
            raise ValueError(f"the bank has {self.num_classes} classes but the logits have {c}")
        _validate.same_device(logits=logits, index=index, valid=valid)
        if valid is not None:
            _validate.valid_mask(valid, b)
        idx = _validate.canonical_index(index)
        if cfg.validate and valid is None:
            idx = _validate.checked_index(idx, self.num_samples)  # under torch.compile an op whose output is used
        elif cfg.validate:
            _validate.index_values(idx[valid], self.num_samples)  # duplicates only among the valid samples
            _validate.index_range(idx, self.num_samples)
        name = _dispatch.resolve(cfg.backend, logits.device, (logits.dtype, self.dtype))
        if extra_check is not None:
            extra_check()
        return idx, name

    # ------------------------------------------------------------------ per kind
    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def device(self) -> torch.device:
        return self.storage.device

    def begin(self, logits, index, valid, update, cfg, extra_check) -> StepPlan:
        raise NotImplementedError

    def fetch(self, plan: StepPlan):
        raise NotImplementedError

    def commit(self, plan: StepPlan, rows: torch.Tensor) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ read-outs
    def label_share_sum(self, index: torch.Tensor, valid, rows):
        """(sum over the batch's valid samples of the label's share t_i[y_i] of its row, their
        count) for tau_e="auto" (docs/method.md §10), from the rows the step just wrote:
        ``rows`` when the step ran on a copy, else B rows gathered from the bank. No pass over
        the bank, and no host sync where the labels live with the rows (the host kinds:
        HostBank's override); the sum is a 0-d float32 tensor on the step's device."""
        idx = index.to(torch.int64).clamp(0, self.num_samples - 1)  # an unchecked id's loss is already NaN
        if rows is None:
            rows = self.rows(idx)
        lab = self.labels.index_select(0, idx.to(self.labels.device)).to(rows.device, torch.int64)
        return label_share_of(rows, lab, valid)

    def held_ids(self) -> torch.Tensor:
        """Global ids of the rows this process holds, in storage order."""
        return torch.arange(self.storage.shape[0])

    def iter_rows(self, chunk_rows: int = 65536):
        """(global ids, rows) of the rows this process owns, ``chunk_rows`` at a time. Across
        the ranks of a distributed bank every row is owned by exactly one rank (a replica
        owns the ids rank, rank + world, ...), so per-rank results add up to the whole bank."""
        store, ids = self.storage, self.held_ids()
        for k in range(0, store.shape[0], chunk_rows):
            yield ids[k:k + chunk_rows], store[k:k + chunk_rows]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The bank rows of ``index`` (global ids); a collective for the distributed kinds."""
        raise NotImplementedError

    def full(self) -> torch.Tensor:
        """The whole bank [N, C]; a collective for the distributed kinds."""
        raise NotImplementedError

    # ------------------------------------------------------------------ module plumbing
    def move(self, fn) -> None:
        """Applies a Module._apply function (``.to()``, ``.cuda()``, ...) to the storage."""
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError

    def load_state(self, state: dict, errors: list) -> None:
        raise NotImplementedError


def label_share_of(rows: torch.Tensor, labels: torch.Tensor, valid):
    """valid_sum of each row's label share rows[i, y_i] / sum_j rows[i, j], in float32."""
    share = rows.gather(1, labels[:, None]).float().div_(rows.sum(1, keepdim=True, dtype=torch.float32))
    return valid_sum(share[:, 0], valid)


def valid_sum(values: torch.Tensor, valid):
    """(the sum of ``values`` over the valid samples, their count: an int, or a 0-d tensor
    when a mask is given, so that reading it needs no host sync)."""
    if valid is None:
        return values.sum(), values.shape[0]
    ok = valid.to(values.device)
    return torch.where(ok, values, 0).sum(), ok.sum()

"""The local bank: one process, the rows in place on the training device (``DPSLoss``)."""
from __future__ import annotations

import torch

from .. import _fast_path
from ..ops._common import GradCache
from . import state as bank_state
from .base import Bank, StepPlan


class LocalBank(Bank):
    """All N rows in one tensor; the fused step updates them in place. With a ``valid``
    mask that excludes some rows, the step runs on a copy and only the valid rows are
    written back."""

    kind = "local"

    def __init__(self, alpha: torch.Tensor, labels: torch.Tensor):
        super().__init__(*alpha.shape)
        self.storage, self.labels = alpha, labels

    def step(self, logits, index, valid, update: bool, cfg, extra_check=None):
        """The base class's step; a call with every sample valid and nothing else to check
        first tries the eager fast path, which runs the same step on the bank in place
        (or declines, untouched, to the base class's checks and messages). Logits whose
        gradient buffer is worth reusing (GradCache.pays_off: >= 32 MiB on CPU) take the base
        class's step, which reuses it: the fast path saves ~10 us, fresh pages cost milliseconds."""
        if valid is None and extra_check is None and not (logits.requires_grad and GradCache.pays_off(logits)):
            loss = _fast_path.step(logits, index, self.storage, cfg.gamma, cfg.tau_e, cfg.target, cfg.reduction,
                                   update, cfg.validate, cfg.backend)
            if loss is not None:
                return loss, None
        return super().step(logits, index, valid, update, cfg, extra_check)

    def begin(self, logits, index, valid, update, cfg, extra_check) -> StepPlan:
        idx, name = self.check_local(logits, index, valid, cfg, extra_check)
        if self.storage.device != logits.device:
            raise ValueError(f"the bank is on {self.storage.device} but the logits are on {logits.device}: move the "
                             f"loss with .to(device)")
        if valid is not None and bool(valid.all()):
            valid = None
        return StepPlan(logits, idx, valid, update, name, gathered=valid is not None)

    def fetch(self, plan: StepPlan):
        if plan.valid is None:
            return self.storage, plan.index
        rows = self.storage.index_select(0, plan.index)
        return rows, torch.arange(rows.shape[0], device=rows.device)

    def commit(self, plan: StepPlan, rows: torch.Tensor) -> None:
        if plan.valid is not None:
            self.storage.index_copy_(0, plan.index[plan.valid], rows[plan.valid])

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.storage.index_select(0, index.to(self.storage.device, torch.int64))

    def full(self) -> torch.Tensor:
        return self.storage.clone()

    def move(self, fn) -> None:
        """Module casts move the rows and labels but keep their dtypes (banks/state.py)."""
        self.storage, self.labels = bank_state.keep_dtype(fn, self.storage), bank_state.keep_dtype(fn, self.labels)

    def convert(self, dtype) -> None:
        """``DPSLoss.to_bank_dtype``: checked as at construction, then one copy."""
        self.storage = bank_state.converted(self.storage, dtype)

    def state(self) -> dict:
        return {"alpha": self.storage, "given_labels": self.labels}

    def load_state(self, state: dict, errors: list) -> None:
        """Verifies every tensor of ``state`` before writing any (banks/state.py)."""
        try:
            staged = bank_state.verified(state, "alpha", self.storage, self.labels, self.num_classes)
        except bank_state.LOAD_ERRORS as e:
            errors.append(str(e))
            return
        bank_state.write(staged, "alpha", self.storage, self.labels)

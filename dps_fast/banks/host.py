"""The host bank: one process, the rows in (pinned) host memory, the model on the GPU.

For banks that do not fit next to the model on the device (ImageNet-21k: 14M x 21,841).
Each step gathers the batch's rows on the host and copies them to the device, the fused
step runs there, and the updated rows go back with a non-blocking copy that overlaps the
backward pass; they are written into the bank at the start of the next step (or at
``flush()``). ``prefetch(next_index)`` starts the next batch's gather early; rows that the
pending write-back touches are re-read, so a prefetch is never stale."""
from __future__ import annotations

import torch

from .. import _validate as checks
from .base import Bank, StepPlan


class HostBank(Bank):
    kind = "host"

    def __init__(self, alpha: torch.Tensor, labels: torch.Tensor, device=None):
        super().__init__(*alpha.shape)
        self.target_device = torch.device(device) if device is not None else torch.device("cpu")
        self.pinned = self.target_device.type == "cuda"
        self._rows = alpha.cpu().pin_memory() if self.pinned else alpha.cpu()
        self.labels = labels.cpu()
        self._pending = None     # (index on the host, host rows, copy-done event)
        self._prefetched = None  # (index on the host, device rows)

    @property
    def storage(self) -> torch.Tensor:
        self.flush()
        return self._rows

    def flush(self) -> None:
        """Writes the pending write-back into the host bank."""
        if self._pending is not None:
            idx, buf, ev = self._pending
            if ev is not None:
                ev.synchronize()
            self._rows.index_copy_(0, idx, buf)
            self._pending = None

    def _gather(self, idx_cpu: torch.Tensor) -> torch.Tensor:
        rows = self._rows.index_select(0, idx_cpu)
        if self.pinned:
            rows = rows.pin_memory()
        return rows.to(self.target_device, non_blocking=True)

    def prefetch(self, index: torch.Tensor) -> None:
        idx = checks.canonical_index(index).cpu()
        checks.index_values(idx, self.num_samples)
        self._prefetched = (idx, self._gather(idx))

    def begin(self, logits, index, valid, update, cfg, extra_check) -> StepPlan:
        idx, name = self.check_local(logits, index, valid, cfg, extra_check)
        return StepPlan(logits, idx, valid, update, name, extra={"host_index": idx.cpu()})

    def fetch(self, plan):
        idx = plan.extra["host_index"]
        pending = self._pending[0] if self._pending is not None else None
        self.flush()
        pre, self._prefetched = self._prefetched, None
        if pre is not None and torch.equal(pre[0], idx):
            rows = pre[1]
            if pending is not None:
                stale = torch.isin(idx, pending)
                if bool(stale.any()):
                    rows = rows.clone()
                    rows[stale.to(rows.device)] = self._gather(idx[stale])
        else:
            rows = self._gather(idx)
        rows = rows.to(plan.device)
        return rows, torch.arange(rows.shape[0], device=rows.device)

    def commit(self, plan, rows):
        idx = plan.extra["host_index"]
        if plan.valid is not None:
            keep = plan.valid.cpu()
            idx, rows = idx[keep], rows[keep.to(rows.device)]
        buf = rows.to("cpu", non_blocking=self.pinned)
        ev = None
        if self.pinned:
            ev = torch.cuda.Event()
            ev.record()
        self._pending = (idx, buf, ev)

    def rows(self, index):
        return self.storage.index_select(0, index.cpu().to(torch.int64))

    def full(self):
        return self.storage.clone()

    def move(self, fn):
        """The bank stays on the host; moving the module moves where the step runs."""
        probe = fn(torch.empty(0))
        if probe.device.type != "meta":
            self.target_device = probe.device
            self.pinned = self.target_device.type == "cuda" and torch.cuda.is_available()

    def state(self):
        return {"bank": self.storage}

    def load_state(self, state, errors):
        if "bank" in state:
            if tuple(state["bank"].shape) != tuple(self._rows.shape):
                errors.append(f"bank: saved shape {tuple(state['bank'].shape)}, this bank is {tuple(self._rows.shape)}")
                return
            self.storage.copy_(state["bank"])

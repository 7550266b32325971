"""The host bank: one process, the rows in (pinned) host memory, the model on the GPU.

For banks that do not fit next to the model on the device (ImageNet-21k: 14M x 21,841).
Each step gathers the batch's rows on the host and copies them to the device, the fused
step runs there, and the updated rows go back with a non-blocking copy that overlaps the
backward pass; they are written into the bank at the start of the next step (or at
``flush()``). ``prefetch(next_index)`` starts the next batch's gather early.

A prefetch is never stale: it remembers the bank's version counter when it was gathered.
The write-back (``flush()``, whoever triggers it: the next step, ``.alpha``, ``targets()``)
re-reads the prefetched rows it touches and moves the remembered version on; any other
write into the bank (``load_state_dict``, an in-place edit of ``.alpha``) leaves the
versions apart, and the step then gathers its rows anew. (A write that bypasses PyTorch's
version counter, e.g. through a numpy view of the bank, is not seen: call ``prefetch``
again after one.)"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _validate
from . import state as bank_state
from .base import Bank, StepPlan, label_share_of


@dataclass
class _Prefetch:
    index: torch.Tensor  # int64 ids on the host
    rows: torch.Tensor   # their rows on the step's device
    version: int         # the host bank's version counter that ``rows`` reflect


class HostBank(Bank):
    kind = "host"

    def __init__(self, alpha: torch.Tensor, labels: torch.Tensor, device=None):
        super().__init__(*alpha.shape)
        self.target_device = torch.device(device) if device is not None else torch.device("cpu")
        self.pinned = self.target_device.type == "cuda"
        self._rows = alpha.cpu().pin_memory() if self.pinned else alpha.cpu()
        self.labels = labels.cpu()
        self._pending = None     # (index on the host, host rows, copy-done event)
        self._prefetched = None  # _Prefetch: index on the host, device rows, bank version

    @property
    def storage(self) -> torch.Tensor:
        self.flush()
        return self._rows

    def flush(self) -> None:
        """Writes the pending write-back into the host bank, and re-reads the rows of a
        prefetch that it touches."""
        if self._pending is not None:
            idx, buf, ev = self._pending
            if ev is not None:
                ev.synchronize()
            current = self._prefetch_is_current()
            self._rows.index_copy_(0, idx, buf)
            self._pending = None
            if current:
                self._refresh_prefetch(idx)

    def _prefetch_is_current(self) -> bool:
        """True if no write reached the bank since the prefetch gathered its rows."""
        pre = self._prefetched
        return pre is not None and pre.version == self._rows._version

    def _refresh_prefetch(self, written: torch.Tensor) -> None:
        """The write-back of ``written`` ids just landed: re-read those of the prefetch."""
        pre = self._prefetched
        stale = torch.isin(pre.index, written)
        if bool(stale.any()):
            pre.rows[stale.to(pre.rows.device)] = self._gather(pre.index[stale])
        pre.version = self._rows._version

    def _gather(self, idx_cpu: torch.Tensor) -> torch.Tensor:
        rows = self._rows.index_select(0, idx_cpu)
        if self.pinned:
            rows = rows.pin_memory()
        return rows.to(self.target_device, non_blocking=True)

    def prefetch(self, index: torch.Tensor) -> None:
        idx = _validate.canonical_index(index).cpu()
        _validate.index_values(idx, self.num_samples)
        self._prefetched = _Prefetch(idx, self._gather(idx), self._rows._version)

    def begin(self, logits, index, valid, update, cfg, extra_check) -> StepPlan:
        idx, name = self.check_local(logits, index, valid, cfg, extra_check)
        self._last_host_index = idx.cpu()
        return StepPlan(logits, idx, valid, update, name, extra={"host_index": self._last_host_index})

    def label_share_sum(self, index, valid, rows):
        """Bank.label_share_sum with the labels gathered on the host by the ids begin() already
        copied there, and sent with the rows' stream (pinned, non-blocking): no host sync."""
        lab = self.labels.index_select(0, self._last_host_index.clamp(0, self.num_samples - 1))
        lab = (lab.pin_memory() if self.pinned else lab).to(rows.device, non_blocking=self.pinned)
        return label_share_of(rows, lab, valid)

    def fetch(self, plan):
        idx = plan.extra["host_index"]
        self.flush()
        if not self._prefetch_is_current():
            self._prefetched = None  # the bank changed since the prefetch by another way than flush()
        pre = self._prefetched
        if pre is not None and torch.equal(pre.index, idx):
            rows, self._prefetched = pre.rows, None
        else:
            rows = self._gather(idx)  # a prefetch of another batch stays for its own step
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
        """The bank stays on the host in its dtype (banks/state.py): moving the module moves
        where the step runs; a cast (``.half()``) changes nothing here."""
        probe = fn(torch.empty(0))
        if probe.device.type != "meta":
            self.target_device = probe.device
            self.pinned = self.target_device.type == "cuda" and torch.cuda.is_available()

    def convert(self, dtype):
        """``DPSLoss.to_bank_dtype``: checked as at construction, then one copy (pinned as the
        bank was); a prefetch holds rows of the old dtype and is dropped."""
        self._rows = bank_state.converted(self.storage, dtype, pin=self._rows.is_pinned())
        self._prefetched = None

    def state(self):
        return {"bank": self.storage, "given_labels": self.labels}

    def load_state(self, state, errors):
        """Verifies every tensor of ``state`` before writing any (banks/state.py); the write
        goes through ``storage`` (the pending write-back lands first, then is overwritten)."""
        try:
            staged = bank_state.verified(state, "bank", self._rows, self.labels, self.num_classes)
        except bank_state.LOAD_ERRORS as e:
            errors.append(str(e))
            return
        bank_state.write(staged, "bank", self.storage, self.labels)

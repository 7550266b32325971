"""The top-k bank in host memory (``HostDPSLoss(..., top_k=k)``, docs/method.md §12): the rows
(ids, values, rest, bound) stay in (pinned) host memory and the step runs on the logits'
device. A step moves the batch's rows there and back as B * (2k + 2) numbers, not B * C: at
k = 32 and C = 21,841, 264 bytes a row instead of 87,364.

The gather and the write-back are synchronous so far: ``prefetch`` checks its ids and
``flush`` has nothing to write (the dense host bank overlaps both with the step; issue 26).
"""
from __future__ import annotations

import torch

from .. import _validate
from .. import topk as T
from .base import StepPlan
from .topk_local import LocalTopKBank


class HostTopKBank(LocalTopKBank):
    """A LocalTopKBank whose rows live on the host while the step runs on ``target_device``."""

    kind = "host"

    def __init__(self, rows: T.TopKRows, labels: torch.Tensor, device=None):
        # not pinned: a gather of rows makes a pageable copy anyway, and pinning would copy the bank
        self.target_device = torch.device(device) if device is not None else torch.device("cpu")
        host = [t.cpu() for t in (rows.ids, rows.vals, rows.rest, rows.bound)]
        super().__init__(T.TopKRows(host[0], host[1], host[2], rows.num_classes, host[3]), labels.cpu())

    def begin(self, logits, index, valid, update, cfg, extra_check) -> StepPlan:
        """The local bank's plan without its same-device rule: the rows travel to the logits."""
        idx, _ = self.check_local(logits, index, valid, cfg, extra_check)
        if update:
            self.refuse_recompute()
        return StepPlan(logits, idx, valid, update, "reference", gathered=True)

    def prefetch(self, index: torch.Tensor) -> None:
        """Checks the next batch's ids (the gather itself happens in its step, so far)."""
        _validate.index_values(_validate.canonical_index(index).cpu(), self.num_samples)

    def flush(self) -> None:
        """Nothing is pending: each step writes its rows back before it returns."""

    def move(self, fn) -> None:
        """The rows stay on the host in their dtypes: moving the module moves where the step runs."""
        probe = fn(torch.empty(0))
        if probe.device.type != "meta":
            self.target_device = probe.device

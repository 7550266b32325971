"""Index checks of CUDA tensors on the device, without a host synchronisation (issue 25, item 5;
docs/method.md §9): the default CUDA step never waits for the GPU, so the CPU can run ahead.

A checked call computes the status of its index on the device (how many ids lie outside
[0, N), the first of them, the smallest duplicate) and runs the step with the index *gated*:
unchanged if the status is good, every id -1 otherwise, which every backend skips (nothing is
written, the losses are NaN). The status is copied to pinned host memory behind a CUDA event,
and read when it has arrived: the error, with the message the host check gives, is raised at
the start of the next checked call, or by anything that reads the bank out (``state_dict``,
read-outs, saves), which waits for it. ``DPS_FAST_SYNC_CHECKS=1`` restores the immediate,
synchronising host check (for debugging).

:func:`on_device` says which indices take this path; tests force it for CPU tensors, where
the status is simply there (no event).
"""
from __future__ import annotations

import os

import torch

NO_DUPLICATE = torch.iinfo(torch.int64).max
_MAX_PENDING = 64  # checks in flight before a call waits for the oldest (bounds the pinned buffers)
_pending: list = []


def on_device(index: torch.Tensor) -> bool:
    """Whether ``index`` is checked on the device: CUDA tensors, unless DPS_FAST_SYNC_CHECKS=1."""
    return index.is_cuda and os.environ.get("DPS_FAST_SYNC_CHECKS", "0") != "1"


def status(idx: torch.Tensor, n: int) -> torch.Tensor:
    """[ids outside [0, n), the first of them (0 if none), the smallest duplicate (NO_DUPLICATE
    if none)] as int64 on the index's device: device ops only, no host read."""
    bad = (idx < 0) | (idx >= n)
    first_bad = idx.gather(0, bad.to(torch.uint8).argmax().view(1))
    if idx.numel() > 1:
        s = idx.sort().values
        dup = torch.where(s[1:] == s[:-1], s[1:], NO_DUPLICATE).amin().view(1)
    else:
        dup = torch.full((1,), NO_DUPLICATE, dtype=torch.int64, device=idx.device)
    return torch.cat([bad.sum().view(1), first_bad, dup])


class _Pending:
    """One call's status on its way to the host."""

    def __init__(self, found: torch.Tensor, n: int):
        self.n = n
        if found.is_cuda:
            self.host = torch.empty(3, dtype=torch.int64, pin_memory=True)
            self.host.copy_(found, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = found, None

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def failure(self):
        """(ids outside, the first of them, the smallest duplicate, n) if the call's check
        failed, else None; waits for the status if it has not arrived."""
        if self.event is not None:
            self.event.synchronize()
        count, first_bad, dup = self.host.tolist()
        return (count, first_bad, dup, self.n) if count or dup != NO_DUPLICATE else None


def first_failure(wait: bool):
    """The failure of the oldest failed check among those that have arrived (all of them with
    ``wait``), or None; drops every check it reads (and, after a failure, the rest: later calls
    of a failed run are not reported again). dps_fast/_validate.py raises it."""
    while _pending and (wait or _pending[0].ready() or len(_pending) > _MAX_PENDING):
        failed = _pending.pop(0).failure()
        if failed is not None:
            _pending.clear()
            return failed
    return None


def gated_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """The int64 index ``idx`` as the step may use it: unchanged if its check passes, else every
    id -1 (the caller raises earlier failures first, _validate.raise_deferred)."""
    found = status(idx, n)
    _pending.append(_Pending(found, n))
    ok = (found[0] == 0) & (found[2] == NO_DUPLICATE)
    return torch.where(ok, idx, -1)

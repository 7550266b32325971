"""The collectives of the distributed banks: every one has a timeout and counts the bytes
it delivers, and bad input on any rank becomes the same exception on every rank."""
from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

from .._dispatch import BackendUnavailableError

# torch >= 2.13 renames all_gather_into_tensor (2.11 has only the old name)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_ERRORS = {e.__name__: e for e in (IndexError, ValueError, TypeError, RuntimeError, BackendUnavailableError,
                                     FileNotFoundError, OSError)}


def require_process_group():
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("dps_fast: call torch.distributed.init_process_group() before creating a distributed "
                           "bank (the bank is laid out for the process group's world size)")


class Collective:
    """A process group, a timeout, and a count of received bytes."""

    def __init__(self, group=None, timeout_s: float = 120.0):
        require_process_group()
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.timeout = datetime.timedelta(seconds=float(timeout_s))
        self.received_bytes = 0
        self.wait_s = 0.0  # time inside collectives (issue + wait: none of it overlaps compute)

    def _run(self, start, *received):
        """Runs one collective (``start()`` returns its async work), waits with the timeout,
        and counts its time and the bytes it delivered."""
        t0 = time.perf_counter()
        work = start()
        if work is not None:
            work.wait(self.timeout)
        self.wait_s += time.perf_counter() - t0
        for t in received:
            ts = t if isinstance(t, (list, tuple)) else [t]
            self.received_bytes += sum(x.numel() * x.element_size() for x in ts)

    def check_world(self):
        w = dist.get_world_size(self.group)
        if w != self.world:
            raise RuntimeError(f"world size changed from {self.world} to {w}: re-create the loss, or "
                               f"save_bank / load_bank to re-shard")

    def agree(self, error: BaseException | None, count: int, device) -> list[int]:
        """All-gathers (error flag, count) from every rank. If any rank failed, every rank
        raises that rank's exception (the lowest such rank), with its type and message.
        Returns every rank's count."""
        t = torch.tensor([0 if error is None else 1, count], dtype=torch.int64, device=device)
        out = torch.empty(self.world * 2, dtype=torch.int64, device=device)
        self._run(lambda: _all_gather_flat(out, t, group=self.group, async_op=True), out)
        flags = out.view(self.world, 2).tolist()
        if any(f for f, _ in flags):
            self._raise_agreed(error, [f for f, _ in flags])
        return [n for _, n in flags]

    def _raise_agreed(self, error, flags):
        msg = None if error is None else (type(error).__name__, str(error))
        msgs = [None] * self.world
        dist.all_gather_object(msgs, msg, group=self.group)
        r = next(i for i, f in enumerate(flags) if f)
        name, text = msgs[r]
        raise _ERRORS.get(name, RuntimeError)(f"{text} (rank {r})") from error

    def all_gather_rows(self, x: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """Every rank's ``x`` ([count, ...] on each rank), as a list in rank order."""
        bmax = max(counts) if counts else 0
        pad = x.new_zeros((bmax,) + tuple(x.shape[1:]))
        pad[: x.shape[0]] = x
        out = x.new_empty((self.world * bmax,) + tuple(x.shape[1:]))
        self._run(lambda: _all_gather_flat(out, pad, group=self.group, async_op=True), out)
        return [out[r * bmax: r * bmax + counts[r]] for r in range(self.world)]

    def all_to_all_rows(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]):
        out = send.new_empty((sum(recv_counts),) + tuple(send.shape[1:]))
        send = send.contiguous()
        self._run(lambda: dist.all_to_all_single(out, send, recv_counts, send_counts, group=self.group,
                                                 async_op=True), out)
        return out

    def barrier(self):
        dist.barrier(group=self.group)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduces ``t`` in place (the sum over the ranks), under the timeout."""
        self._run(lambda: dist.all_reduce(t, group=self.group, async_op=True), t)
        return t

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows ``t`` ([n_r, ...], n_r may differ), concatenated in rank order."""
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        counts = [int(c) for c in torch.cat(self.all_gather_rows(n, [1] * self.world))]
        return torch.cat(self.all_gather_rows(t, counts))


class LocalCollective:
    """The collectives of one process (a local or host bank, a bank tensor): nothing to
    exchange. The read-outs (label issues, mean_label_error) run the same code on both."""

    world, rank, group = 1, 0, None

    @staticmethod
    def sum_(t: torch.Tensor) -> torch.Tensor:
        return t

    @staticmethod
    def gather_rows(t: torch.Tensor) -> torch.Tensor:
        return t


def collective_of(source, world: int):
    """The collective a read-out of ``source`` (a DPSLoss or a bank-like object) runs on: its
    distributed bank's own (the bank's timeout and process group), else one over its group."""
    if world <= 1:
        return LocalCollective()
    comm = getattr(getattr(source, "store", None), "comm", None)
    return comm if isinstance(comm, Collective) else Collective(getattr(source, "group", None))

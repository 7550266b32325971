"""DPS under torch.distributed: one consistent posterior bank across the ranks.

``DistributedDPSLoss(labels, num_classes, mode=...)`` is :class:`dps_fast.DPSLoss` with a
distributed bank (docs/method.md, "Banks"):

- ``"replicated"``: every rank holds the whole bank [N, C]; each rank runs the fused step
  on its batch's rows, then the ranks all-gather the updated rows and every rank writes
  all of them. Memory N*C per rank.
- ``"sharded"`` (``"auto"`` picks it for banks over ``shard_above_bytes``): rank r holds
  only the rows ``id % world == r``, built from the labels alone; a step fetches the
  batch's rows from their owners, runs the fused step, and returns the updated rows.
  Memory N*C/world per rank.

Both give the same bank, targets and losses as one process that sees the global batch.
``valid`` marks the real samples of a batch: ``DistributedSampler`` pads the epoch by
repeating samples; pass ``valid=False`` for those (see :func:`padding_mask`): they get a
loss but never update the bank. Every call is a collective; bad input on any rank raises
the same exception on every rank before any bank is written; every collective has a
timeout. ``save_bank`` / ``load_bank`` write and read one file per rank and re-shard to
any world size, streaming (peak memory: one shard plus a 32 MB buffer).
"""
from __future__ import annotations

import warnings

import torch

from . import _validate
from .banks import DistributedBank, padding_mask
from .banks import shard_files, topk_saves
from .banks.collective import require_process_group
from .loss import DPSLoss

MODES = ("replicated", "sharded")


class DistributedDPSLoss(DPSLoss):
    """``DPSLoss`` with a replicated or sharded bank; ``mode`` is "replicated", "sharded" or
    "auto" (sharded above ``shard_above_bytes``, default 256 MB). ``timeout_s`` bounds every
    collective. Call ``loss(logits, index, features=None, valid=None)``, in ``DPSLoss``'s
    argument order, with global sample ids."""

    def __init__(self, labels=None, num_classes=None, mode: str = "auto", **kw):
        if mode not in MODES + ("auto",):
            raise ValueError(f"mode must be one of {MODES} or 'auto', got {mode!r}")
        require_process_group()
        super().__init__(labels, num_classes, bank=mode, **kw)
        if not isinstance(self.store, DistributedBank):  # auto in a world of one
            raise RuntimeError("DistributedDPSLoss needs a process group of 2 or more ranks; use DPSLoss")

    def forward(self, logits, index, features=None, valid=None):
        """As :meth:`DPSLoss.forward`, in its argument order (``features`` before ``valid``), so
        that positional arguments mean the same in both classes."""
        return super().forward(logits, index, features=features, valid=valid)

    @property
    def mode(self) -> str:
        """The bank kind in use: "replicated" or "sharded"."""
        return self.store.kind

    @property
    def world(self) -> int:
        """The number of ranks sharing the bank."""
        return self.store.world

    @property
    def rank(self) -> int:
        """This process's rank in the bank's process group."""
        return self.store.rank

    @property
    def bank(self) -> torch.Tensor:
        """Deprecated: :attr:`alpha`, this rank's rows: the whole bank (replicated) or rows
        rank, rank + W, ... (sharded)."""
        warnings.warn("DistributedDPSLoss.bank is deprecated: use .alpha (this rank's rows)", DeprecationWarning,
                      stacklevel=2)
        return self.alpha

    @property
    def comm_bytes(self) -> int:
        """Bytes delivered into this rank's receive buffers by the collectives so far."""
        return self.store.comm.received_bytes

    def extra_repr(self):
        return f"mode={self.mode!r}, world={self.world}, rank={self.rank}, " + super().extra_repr()


def save_bank(loss: DistributedDPSLoss, folder: str) -> str:
    """Writes this rank's rows to ``folder`` (one file per rank), then rank 0 commits the save
    with its manifest, ``bank-index.json`` (a collective; every file written atomically)."""
    _validate.raise_deferred()  # an earlier step's failed device-side index check
    return loss.store.save(folder)


def load_bank(loss: DistributedDPSLoss, folder: str) -> None:
    """Loads a bank saved with any world size, each rank reading only the rows it holds. Every
    file read is verified first (manifest, header, size, save id, checksum, values); a bad or
    unfinished save raises ValueError / FileNotFoundError on every rank, the bank unchanged."""
    loss.store.load(folder)


def read_full_bank(folder: str) -> torch.Tensor:
    """The whole saved bank [N, C] in this process (offline tools; N*C memory), verified as
    ``load_bank`` verifies it; of a top-k save, its implied dense rows (float32)."""
    doc = shard_files.read_manifest(folder)
    k = shard_files.layout_of(doc, shard_files.manifest_path(folder)).k
    if k is not None:
        return topk_saves.read_implied_bank(folder, doc, k)
    full = torch.empty(doc["num_samples"], doc["num_classes"], dtype=shard_files.saved_dtype(doc))
    shard_files.load_rows(folder, full, doc["num_samples"], 0, 1, strided=False)
    return full


def traffic_model(n: int, c: int, b: int, world: int, bytes_per: int = 4) -> dict:
    """Per-rank bank memory, and bytes delivered into one rank's receive buffers per step
    (its own share included, the (error, count) header left out), for a local batch of b
    samples: an id is 8 bytes (its validity travels in its sign), a row c * bytes_per.
    Sharded assumes the batch's ids spread evenly over the owners (random sampling)."""
    row = c * bytes_per
    return {
        "world": world,
        "replicated_bank_bytes": n * row,
        "sharded_bank_bytes": -(-n // world) * row,
        # all-gather of the ids, all-gather of the updated rows
        "replicated_step_bytes": world * b * (8 + row),
        # all-gather of the ids, the rows from their owners, the updated rows back to them
        "sharded_step_bytes": world * b * 8 + 2 * b * row,
    }


__all__ = ["DistributedDPSLoss", "save_bank", "load_bank", "read_full_bank", "padding_mask", "traffic_model",
           "MODES"]

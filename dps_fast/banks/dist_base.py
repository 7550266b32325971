"""What the replicated and sharded banks share: the agreed begin of a step, the global
batch, checkpoints of one file per rank."""
from __future__ import annotations

import os
from dataclasses import replace

import torch
import torch.distributed as dist

from .. import _validate
from . import state as bank_state
from .base import Bank, StepPlan
from .collective import Collective
from . import shard_files


def padding_mask(dataset_len: int, world: int, rank: int, positions: torch.Tensor) -> torch.Tensor:
    """For ``DistributedSampler(drop_last=False)``: rank ``rank`` takes positions
    ``rank, rank + world, ...`` of the padded epoch list, whose entries at positions
    ``>= dataset_len`` repeat earlier samples. ``positions`` are the local positions
    (0, 1, ...) of the batch within this rank's epoch; returns True for real samples."""
    return positions * world + rank < dataset_len


class DistributedBank(Bank):
    """A bank spread over (or copied to) the ranks of a process group. Every call is a
    collective: all ranks call ``step`` together, each with its local batch."""

    strided = False  # this rank holds rows rank, rank + world, ... (a shard), not all rows

    def __init__(self, num_samples: int, num_classes: int, comm: Collective):
        super().__init__(num_samples, num_classes)
        self.comm = comm

    @property
    def world(self) -> int:
        return self.comm.world

    @property
    def rank(self) -> int:
        return self.comm.rank

    def begin(self, logits, index, valid, update, cfg, extra_check) -> StepPlan:
        """Validates on every rank and agrees on the outcome, then shares the global batch:
        every rank learns every rank's ids and validity (one small all-gather)."""
        error, idx, name = None, None, None
        try:
            self.comm.check_world()
            # ids are always checked here: they route rows between ranks
            idx, name = self.check_local(logits, index, valid, replace(cfg, validate=True), extra_check)
        except (IndexError, ValueError, TypeError, RuntimeError) as e:
            error = e
        counts = self.comm.agree(error, 0 if idx is None else idx.numel(), self.device)
        ok = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid.to(idx.device)
        code = torch.where(ok, idx, -idx - 1).to(self.device)  # validity travels in the sign
        codes = self.comm.all_gather_rows(code, counts)
        ids = [torch.where(c >= 0, c, -c - 1) for c in codes]
        oks = [c >= 0 for c in codes]
        # the global batch's valid samples, the same on every rank (tau_e="auto" counts passes with it)
        self.last_step_samples = int(sum(int(o.sum()) for o in oks))
        dup = _validate.first_duplicate(torch.cat([i[o] for i, o in zip(ids, oks)]))
        if dup is not None:  # every rank sees the same global batch, so every rank raises this
            raise ValueError(f"index contains duplicate id {dup} across ranks in one step; ids of one global "
                             f"step must be distinct among valid samples")
        return StepPlan(logits, idx, valid, update, name, extra={"counts": counts, "ids": ids, "valid": oks})

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: str) -> str:
        """Writes this rank's rows (global ids rank, rank + W, ...) and, once every rank has
        written, rank 0 commits the save with the manifest (shard_files). A collective; a
        failure on any rank raises on every rank, and a save that did not commit never loads."""
        os.makedirs(folder, exist_ok=True)
        save_id = self._on_rank0(shard_files.new_save_id)
        path = shard_files.shard_path(folder, self.rank, self.world)
        meta = {"save_id": save_id, "world": self.world, "rank": self.rank, "num_samples": self.num_samples,
                "num_classes": self.num_classes}
        entry, error = None, None
        try:
            entry = self.write_shard(path, meta)
        except (OSError, ValueError) as e:
            error = e
        self.comm.agree(error, 0, self.device)
        entries = [None] * self.world
        dist.all_gather_object(entries, entry, group=self.comm.group)
        self._on_rank0(lambda: self._commit(folder, save_id, entries))
        return path

    def _commit(self, folder: str, save_id: str, entries: list) -> None:
        shard_files.write_manifest(folder, save_id, self.num_samples, self.num_classes, self.saved_dtype, entries,
                                   self.layout_on_disk)
        shard_files.drop_stale_shards(folder, self.world)

    # what a save holds, per bank format (the top-k banks override these three and ``copy_saved``)
    layout_on_disk = shard_files.Layout()

    @property
    def saved_dtype(self) -> torch.dtype:
        return self.storage.dtype

    def write_shard(self, path: str, meta: dict) -> dict:
        """Writes this rank's rows rank, rank + W, ... (shard_files.write_shard)."""
        return shard_files.write_shard(path, self.strided_rows(), meta)

    def copy_saved(self, shards, saved_world: int) -> None:
        """Writes the verified rows of ``shards`` into this rank's storage."""
        shard_files.copy_rows(shards, saved_world, self.storage, self.rank, self.world, self.strided)

    def _on_rank0(self, fn):
        """``fn()`` on rank 0; every rank gets its result, or raises its exception."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except (OSError, ValueError) as e:
                error = e
        self.comm.agree(error, 0, self.device)
        got = [None] * self.world
        dist.all_gather_object(got, result, group=self.comm.group)
        return got[0]

    def load(self, folder: str) -> None:
        """Fills this rank's storage from a save made at any world size (a shard reads only
        the files that hold its rows). Every rank verifies its files before any rank writes a
        row; a failure on any rank raises the same error on every rank, the bank unchanged."""
        doc, shards, error = None, [], None
        try:
            doc, shards = shard_files.open_save(folder, self.num_samples, self.num_classes, self.saved_dtype,
                                                self.rank, self.world, self.strided, self.layout_on_disk)
        except (OSError, ValueError) as e:
            error = e
        try:
            self.comm.agree(error, 0, self.device)
            self.copy_saved(shards, doc["world"])
        finally:
            shard_files.close_all(shards)

    def strided_rows(self) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ module plumbing
    def move(self, fn):
        """Module casts move the rows and labels but keep their dtypes (banks/state.py)."""
        self.storage, self.labels = bank_state.keep_dtype(fn, self.storage), bank_state.keep_dtype(fn, self.labels)

    def convert(self, dtype):
        """``DPSLoss.to_bank_dtype``, a collective: every rank checks its rows, the ranks
        agree, then every rank converts (or every rank raises, no rank converted)."""
        error = None
        try:
            bank_state.check_conversion(self.storage, dtype)
        except bank_state.LOAD_ERRORS as e:
            error = e
        self.comm.agree(error, 0, self.device)
        self.storage = self.storage.to(dtype, memory_format=torch.contiguous_format)

    def state(self):
        return {"bank": self.storage, "bank_layout": self.layout(), "given_labels": self.labels}

    def layout(self) -> torch.Tensor:
        raise NotImplementedError

    def load_state(self, state: dict, errors: list) -> None:
        """Loads a state dict saved by a bank of the same layout (``layout()``). A collective:
        every rank verifies its state dict, the ranks agree, and either every rank writes or
        every rank reports the lowest failing rank's problem (banks/state.py)."""
        error, staged = None, None
        try:
            staged = self._verified(state)
        except bank_state.LOAD_ERRORS as e:
            error = e
        try:
            self.comm.check_world()
            self.comm.agree(error, 0, self.device)
        except (*bank_state.LOAD_ERRORS, RuntimeError) as e:
            errors.append(str(e))
            return
        self._write(staged)

    def _write(self, staged: dict) -> None:
        bank_state.write(staged, "bank", self.storage, self.labels)

    def _verified(self, state: dict) -> dict:
        if "bank" in state:
            want = self.layout().tolist()
            got = state["bank_layout"] if "bank_layout" in state else want
            got = got.tolist() if isinstance(got, torch.Tensor) else got
            if got != want:
                raise ValueError(f"bank layout {got} does not match this process's {want}; use save_bank / "
                                 f"load_bank to re-shard")
        return bank_state.verified(state, "bank", self.storage, self.labels, self.num_classes)

    def held_ids(self) -> torch.Tensor:
        raise NotImplementedError

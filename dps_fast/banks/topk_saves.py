"""save_bank / load_bank of the distributed top-k banks (docs/method.md §8.1, §12): the shard
files of the dense banks, each row saved as its 2k + 2 numbers in float32 (float64 above 2**24
classes, so that the class ids stay exact),
with the manifest naming the layout (shard_files.Layout). A save is formed and a load written a
chunk at a time; a load verifies every file first (ids whole numbers in [0, C), values finite
and > 0, rest and bound finite and >= 0, checksums) and re-shards to any world size.
"""
from __future__ import annotations

import torch

from .. import topk as T
from . import shard_files


def packed_dtype(num_classes: int) -> torch.dtype:
    """float32 holds every class id below 2**24 exactly (and the values are float32): 8k + 8
    bytes a row, moved between ranks and saved; float64 for more classes."""
    return torch.float32 if num_classes <= 2 ** 24 else torch.float64


def pack(rows: T.TopKRows) -> torch.Tensor:
    """[n, 2k + 2] in packed_dtype: ids, values, rest, bound."""
    dt = packed_dtype(rows.num_classes)
    return torch.cat([rows.ids.to(dt), rows.vals.to(dt), rows.rest.to(dt)[:, None], rows.bound.to(dt)[:, None]], 1)


def unpack(packed: torch.Tensor, k: int, num_classes: int, device) -> T.TopKRows:
    p = packed.to(device)  # columns of a float32 block are views: copies, contiguous, for the kernels
    col = lambda a, b: p[:, a:b].to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # noqa: E731
    return T.TopKRows(p[:, :k].to(torch.int64), col(k, 2 * k), col(2 * k, 2 * k + 1)[:, 0], num_classes,
                      col(2 * k + 1, 2 * k + 2)[:, 0])


def read_implied_bank(folder: str, doc: dict, k: int) -> torch.Tensor:
    """The implied dense rows [N, C] (float32) of a whole top-k save, verified as a load is,
    densified a chunk at a time (read_full_bank, offline tools)."""
    n, c = doc["num_samples"], doc["num_classes"]
    full = torch.empty(n, c, dtype=torch.float32)

    def write(at, chunk):
        rows = unpack(chunk, k, c, "cpu")
        full.index_copy_(0, at, T.densify(rows.ids, rows.vals, rows.rest, c).float())

    doc, shards = shard_files.open_save(folder, n, c, packed_dtype(c), 0, 1, False, shard_files.Layout(k))
    try:
        shard_files.copy_rows(shards, doc["world"], None, 0, 1, False, write=write)
    finally:
        shard_files.close_all(shards)
    return full


class TopKSaves:
    """For a DistributedBank holding its rows in ``self.local`` (a LocalTopKBank):
    ``saved_positions()`` are the local positions of rows rank, rank + W, ..."""

    @property
    def saved_dtype(self) -> torch.dtype:
        return packed_dtype(self.num_classes)

    @property
    def layout_on_disk(self) -> shard_files.Layout:
        return shard_files.Layout(self.local.k, shard_files.values_dtype_name(self.local.vals.dtype))

    def write_shard(self, path: str, meta: dict) -> dict:
        at = self.saved_positions()
        shape = torch.empty(at.shape[0], 2 * self.local.k + 2, dtype=self.saved_dtype, device="meta")
        return shard_files.write_shard(path, shape, meta, lambda a, b: pack(self.local.take(at[a:b])))

    def copy_saved(self, shards, saved_world: int) -> None:
        k, c = self.local.k, self.num_classes
        shard_files.copy_rows(shards, saved_world, None, self.rank, self.world, self.strided,
                              write=lambda at, chunk: self.local.put(at, unpack(chunk, k, c, self.device)))

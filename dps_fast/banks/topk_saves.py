"""save_bank / load_bank of the distributed top-k banks (docs/method.md §8.1, §12): the shard
files of the dense banks, each row saved as its 2k + 2 numbers in float64 (class ids exact),
with the manifest naming the layout (shard_files.Layout). A save is formed and a load written a
chunk at a time; a load verifies every file first (ids whole numbers in [0, C), values finite
and > 0, rest and bound finite and >= 0, checksums) and re-shards to any world size.
"""
from __future__ import annotations

import torch

from .. import topk as T
from . import shard_files


def pack(rows: T.TopKRows) -> torch.Tensor:
    """[n, 2k + 2] float64 (class ids exact below 2**53): ids, values, rest, bound."""
    return torch.cat([rows.ids.double(), rows.vals.double(), rows.rest.double()[:, None],
                      rows.bound.double()[:, None]], 1)


def unpack(packed: torch.Tensor, k: int, num_classes: int, device) -> T.TopKRows:
    p = packed.to(device)
    return T.TopKRows(p[:, :k].to(torch.int64), p[:, k:2 * k].float(), p[:, 2 * k].float(), num_classes,
                      p[:, 2 * k + 1].float())


def read_implied_bank(folder: str, doc: dict, k: int) -> torch.Tensor:
    """The implied dense rows [N, C] (float32) of a whole top-k save, verified as a load is,
    densified a chunk at a time (read_full_bank, offline tools)."""
    n, c = doc["num_samples"], doc["num_classes"]
    full = torch.empty(n, c, dtype=torch.float32)

    def write(at, chunk):
        rows = unpack(chunk, k, c, "cpu")
        full.index_copy_(0, at, T.densify(rows.ids, rows.vals, rows.rest, c).float())

    doc, shards = shard_files.open_save(folder, n, c, torch.float64, 0, 1, False, shard_files.Layout(k))
    try:
        shard_files.copy_rows(shards, doc["world"], None, 0, 1, False, write=write)
    finally:
        shard_files.close_all(shards)
    return full


class TopKSaves:
    """For a DistributedBank holding its rows in ``self.local`` (a LocalTopKBank):
    ``saved_positions()`` are the local positions of rows rank, rank + W, ..."""

    saved_dtype = torch.float64

    @property
    def layout_on_disk(self) -> shard_files.Layout:
        return shard_files.Layout(self.local.k)

    def write_shard(self, path: str, meta: dict) -> dict:
        at = self.saved_positions()
        shape = torch.empty(at.shape[0], 2 * self.local.k + 2, dtype=torch.float64, device="meta")
        return shard_files.write_shard(path, shape, meta, lambda a, b: pack(self.local.take(at[a:b])))

    def copy_saved(self, shards, saved_world: int) -> None:
        k, c = self.local.k, self.num_classes
        shard_files.copy_rows(shards, saved_world, None, self.rank, self.world, self.strided,
                              write=lambda at, chunk: self.local.put(at, unpack(chunk, k, c, self.device)))

"""Bank shards on disk, streamed: a save or a load never holds more than one shard and a
small buffer, so a bank that does not fit on one rank can be saved and re-sharded.

Layout: rank r of a world of W writes the rows with global ids r, r + W, r + 2W, ... to
``bank-rank{r}-of-{W}.safetensors`` (the safetensors format: an 8-byte header length, a
JSON header, the raw rows), and rank 0 then writes ``bank-index.json`` naming the world
size of the last complete save. Loading with any world size reads, file by file and chunk
by chunk, only the rows the loading rank holds.
"""
from __future__ import annotations

import glob
import json
import math
import os

import torch

CHUNK_BYTES = 32 * 2 ** 20
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}
INDEX = "bank-index.json"


def shard_path(folder: str, rank: int, world: int) -> str:
    return os.path.join(folder, f"bank-rank{rank}-of-{world}.safetensors")


def _header(rows: torch.Tensor, meta: dict) -> bytes:
    nbytes = rows.numel() * rows.element_size()
    h = {"__metadata__": {k: str(v) for k, v in meta.items()},
         "bank": {"dtype": _DTYPES[rows.dtype], "shape": list(rows.shape), "data_offsets": [0, nbytes]}}
    raw = json.dumps(h).encode()
    return raw + b" " * (-len(raw) % 8)


def write_shard(path: str, rows: torch.Tensor, meta: dict) -> None:
    """Writes ``rows`` [n, C] (any device) atomically, ``CHUNK_BYTES`` at a time."""
    head = _header(rows, meta)
    step = max(1, CHUNK_BYTES // max(1, rows.shape[1] * rows.element_size()))
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for k in range(0, rows.shape[0], step):
            f.write(rows[k:k + step].detach().cpu().contiguous().view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(path: str) -> tuple[dict, torch.dtype, list, int]:
    """(metadata, dtype, shape, offset of the rows) of a shard file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        h = json.loads(f.read(n))
    b = h["bank"]
    return h.get("__metadata__", {}), _FROM_NAME[b["dtype"]], b["shape"], 8 + n + b["data_offsets"][0]


def stream_rows(path: str):
    """Yields (first row, rows chunk) of a shard file; the chunk buffer is reused."""
    _, dtype, (n, c), start = read_header(path)
    step = max(1, CHUNK_BYTES // max(1, c * dtype.itemsize))
    buf = torch.empty(min(step, max(n, 1)), c, dtype=dtype)
    raw = buf.view(torch.uint8).numpy().reshape(-1)
    with open(path, "rb") as f:
        f.seek(start)
        for k in range(0, n, step):
            m = min(step, n - k)
            view = memoryview(raw)[: m * c * dtype.itemsize]
            if f.readinto(view) != len(view):
                raise ValueError(f"{path} is truncated")
            yield k, buf[:m]


def save_index(folder: str, world: int, meta: dict) -> None:
    """Rank 0, after every rank wrote its shard: names the complete save, drops stale shards."""
    tmp = os.path.join(folder, INDEX + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"world": world, **meta}, f)
    os.replace(tmp, os.path.join(folder, INDEX))
    for p in glob.glob(os.path.join(folder, "bank-rank*-of-*.safetensors")):
        if not p.endswith(f"-of-{world}.safetensors"):
            os.remove(p)


def saved_world(folder: str, num_samples: int, num_classes: int) -> int:
    path = os.path.join(folder, INDEX)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no complete bank save in {folder} ({INDEX} is missing)")
    with open(path) as f:
        idx = json.load(f)
    if (idx["num_samples"], idx["num_classes"]) != (num_samples, num_classes):
        raise ValueError(f"the bank saved in {folder} is {idx['num_samples']} x {idx['num_classes']}, this loss "
                         f"expects {num_samples} x {num_classes}")
    world = int(idx["world"])
    missing = [shard_path(folder, r, world) for r in range(world) if not os.path.exists(shard_path(folder, r, world))]
    if missing:
        raise FileNotFoundError(f"incomplete bank save in {folder}: missing {missing}")
    return world


def load_rows(folder: str, storage: torch.Tensor, num_samples: int, rank: int, world: int, strided: bool) -> None:
    """Fills ``storage`` from the save in ``folder``: rows rank, rank + world, ... (``strided``,
    a shard) or all rows (a replica). Reads only the files that hold such rows."""
    num_classes = storage.shape[1]
    saved = saved_world(folder, num_samples, num_classes)
    g = math.gcd(saved, world)
    for r in range(saved):
        if strided and r % g != rank % g:
            continue  # no row of file r is held by this rank
        for k, chunk in stream_rows(shard_path(folder, r, saved)):
            ids = r + saved * torch.arange(k, k + chunk.shape[0])
            if strided:
                mine = ids % world == rank
                ids, chunk = ids[mine] // world, chunk[mine]
            storage.index_copy_(0, ids.to(storage.device), chunk.to(storage.device, storage.dtype))

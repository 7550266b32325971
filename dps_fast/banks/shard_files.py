"""Bank shards on disk, streamed: a save or a load never holds more than one shard and a
small buffer, so a bank that does not fit on one rank can be saved and re-sharded.

Layout: rank r of a world of W writes the rows with global ids r, r + W, r + 2W, ... to
``bank-rank{r}-of-{W}.safetensors`` (the safetensors format: an 8-byte header length, a
JSON header, the raw rows; the header's metadata carries the save id), and rank 0, once
every rank has written, writes the manifest ``bank-index.json``: the save id, world, N, C,
dtype, and each shard's rows, size and CRC-32. Every file is written atomically (a
temporary file, fsync, rename, fsync of the folder), the manifest last: the manifest is
the commit record of a save.

A load verifies every file it reads before it writes any row (:func:`open_save`): the
manifest, each header, the exact file size, the save id (a shard of another or an
unfinished save is an error, never mixed in), the checksum and the values. The verified
files stay open, so the rows copied are the bytes that were verified.
"""
from __future__ import annotations

import glob
import json
import math
import os
import uuid
import zlib
from dataclasses import dataclass

import torch

CHUNK_BYTES = 32 * 2 ** 20
FORMAT = "dps_fast.bank-shards/2"
INDEX = "bank-index.json"  # the manifest
_MAX_HEADER = 2 ** 24  # our headers are < 1 KB; a larger length is a damaged or foreign file
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}
# saved dtype -> bank dtypes it loads into exactly (every value representable: no rounding)
_EXACT_INTO = {"F32": (torch.float32, torch.float64), "F64": (torch.float64,),
               "BF16": (torch.bfloat16, torch.float32, torch.float64),
               "F16": (torch.float16, torch.float32, torch.float64)}


@dataclass(frozen=True)
class Layout:
    """What a saved row holds. ``k is None``: the C values of a dense row. Else a top-k row
    (docs/method.md §12) as 2k + 2 numbers (float32, or float64 above 2**24 classes; saves of
    2026-12-07 and before: float64): k class ids, their values, rest, bound. ``values``: the
    dtype name ("F32", "BF16", "F16") the bank held its values in, so that a load never rounds
    them into a narrower bank (a top-k save without it held float32 values)."""
    k: int | None = None
    values: str | None = None

    def columns(self, num_classes: int) -> int:
        return num_classes if self.k is None else 2 * self.k + 2

    def manifest(self) -> dict:
        if self.k is None:
            return {}
        return {"layout": "topk", "k": self.k, **({"values": self.values} if self.values else {})}

    def describe(self) -> str:
        return "a dense bank" if self.k is None else f"a top-k bank (k = {self.k})"

    def bad_values(self, chunk: torch.Tensor, num_classes: int) -> torch.Tensor:
        """[n, columns] True where a value breaks the rule: dense values finite and > 0; top-k
        class ids whole numbers in [0, C), values finite and > 0, rest and bound finite, >= 0."""
        if self.k is None:
            return ~(torch.isfinite(chunk) & (chunk > 0))
        k, ok = self.k, torch.isfinite(chunk)
        ids = chunk[:, :k]
        ok[:, :k] &= (ids == ids.round()) & (ids >= 0) & (ids < num_classes)
        if k > 1:  # a class held twice: the later column
            ordered, where = ids.sort(1)
            again = torch.zeros_like(ok[:, :k])
            again.scatter_(1, where[:, 1:], ordered.diff(dim=1) == 0)
            ok[:, :k] &= ~again
        ok[:, k:] &= chunk[:, k:] <= torch.finfo(torch.float32).max  # the values are float32 in the bank
        ok[:, k:2 * k] &= chunk[:, k:2 * k] > 0
        ok[:, 2 * k:] &= chunk[:, 2 * k:] >= 0
        return ~ok


def layout_of(doc: dict, path: str) -> Layout:
    """The manifest's layout (dense when it names none: every save before top-k banks)."""
    if "layout" not in doc:
        return Layout()
    k = doc.get("k")
    if doc["layout"] != "topk" or isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < doc["num_classes"]:
        raise ValueError(f"{path}: layout {doc['layout']!r} with k {k!r}; a save is dense or 'topk' with "
                         f"1 <= k < C = {doc['num_classes']}")
    values = doc.get("values", "F32")
    if values not in ("F32", "BF16", "F16"):
        raise ValueError(f"{path}: top-k values saved as {values!r}; expected 'F32', 'BF16' or 'F16'")
    return Layout(k, values)


def values_dtype_name(dtype: torch.dtype) -> str:
    return _DTYPES[dtype]


def shard_path(folder: str, rank: int, world: int) -> str:
    return os.path.join(folder, f"bank-rank{rank}-of-{world}.safetensors")


def manifest_path(folder: str) -> str:
    return os.path.join(folder, INDEX)


def new_save_id() -> str:
    return uuid.uuid4().hex


def expected_rows(num_samples: int, rank: int, world: int) -> int:
    return len(range(rank, num_samples, world))


# ---------------------------------------------------------------------------- writing
def _fsync_dir(folder: str) -> None:
    """Makes a rename durable: without it a crash can lose the new directory entry."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, write_body) -> None:
    """``write_body(f)`` into a temporary file, fsync, rename over ``path``, fsync the folder:
    a reader sees the old file or the whole new one, never a part."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write_body(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _header(rows: torch.Tensor, meta: dict) -> bytes:
    nbytes = rows.numel() * rows.element_size()
    h = {"__metadata__": {k: str(v) for k, v in meta.items()},
         "bank": {"dtype": _DTYPES[rows.dtype], "shape": list(rows.shape), "data_offsets": [0, nbytes]}}
    raw = json.dumps(h).encode()
    return raw + b" " * (-len(raw) % 8)


def write_shard(path: str, rows: torch.Tensor, meta: dict, get=None) -> dict:
    """Writes ``rows`` [n, C] (any device) atomically, ``CHUNK_BYTES`` at a time. Returns the
    shard's manifest entry (file name, rows, bytes, CRC-32 of the whole file). ``get(start,
    stop)``: the rows, formed a chunk at a time (``rows`` then only gives shape and dtype)."""
    head = _header(rows, meta)
    head = len(head).to_bytes(8, "little") + head
    step = max(1, CHUNK_BYTES // max(1, rows.shape[1] * rows.element_size()))
    crc = [zlib.crc32(head), len(head)]

    def body(f):
        f.write(head)
        for k in range(0, rows.shape[0], step):
            part = rows[k:k + step] if get is None else get(k, min(k + step, rows.shape[0]))
            chunk = part.detach().cpu().contiguous().view(torch.uint8).numpy().data
            f.write(chunk)
            crc[0], crc[1] = zlib.crc32(chunk, crc[0]), crc[1] + chunk.nbytes

    _atomic_write(path, body)
    return {"file": os.path.basename(path), "rows": int(rows.shape[0]), "bytes": crc[1], "crc32": f"{crc[0]:08x}"}


def write_manifest(folder: str, save_id: str, num_samples: int, num_classes: int, dtype: torch.dtype,
                   shards: list[dict], layout: Layout = Layout()) -> None:
    """Rank 0, after every rank wrote its shard: commits the save."""
    doc = {"format": FORMAT, "save_id": save_id, "world": len(shards), "num_samples": num_samples,
           "num_classes": num_classes, "dtype": _DTYPES[dtype], **layout.manifest(),
           "shards": [{"rank": r, **s} for r, s in enumerate(shards)]}
    _atomic_write(manifest_path(folder), lambda f: f.write(json.dumps(doc, indent=1).encode()))


def drop_stale_shards(folder: str, world: int) -> None:
    """After the commit: shards of saves at other world sizes are no part of any save."""
    for p in glob.glob(os.path.join(folder, "bank-rank*-of-*.safetensors")):
        if not p.endswith(f"-of-{world}.safetensors"):
            os.remove(p)


# ---------------------------------------------------------------------------- verifying
@dataclass
class ShardFile:
    """An open, verified shard: ``rows`` x ``classes`` values of ``dtype`` from byte ``start``."""
    path: str
    handle: object
    rank: int
    rows: int
    classes: int
    dtype: torch.dtype
    start: int


def _field(doc, key: str, kind: type, where: str):
    v = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise ValueError(f"{where}: field {key!r} is missing or not {kind.__name__} (got {v!r})")
    return v


def _load_json(path: str):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path} is not a bank manifest (not valid JSON: {e})") from None


def read_manifest(folder: str, num_samples: int | None = None, num_classes: int | None = None) -> dict:
    """The checked manifest of the save in ``folder``; N and C must be the given ones (if given)."""
    path = manifest_path(folder)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: no complete bank save in {folder} (a save that did not "
                                f"finish, or not a bank folder)")
    doc = _load_json(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path} is not a bank manifest of format {FORMAT!r} (found {found!r}); saves of older "
                         f"dps_fast versions carry no checksums and do not load")
    for key, kind in (("save_id", str), ("world", int), ("num_samples", int), ("num_classes", int),
                      ("dtype", str), ("shards", list)):
        _field(doc, key, kind, path)
    if doc["dtype"] not in _FROM_NAME:
        raise ValueError(f"{path}: unknown dtype {doc['dtype']!r} (a bank is one of {sorted(_FROM_NAME)})")
    got, want = (doc["num_samples"], doc["num_classes"]), (num_samples, num_classes)
    if got != tuple(g if w is None else w for g, w in zip(got, want)):
        raise ValueError(f"{path}: the saved bank is {got[0]} x {got[1]}, this loss expects {want[0]} x {want[1]}")
    layout_of(doc, path)
    if doc["world"] < 1 or len(doc["shards"]) != doc["world"]:
        raise ValueError(f"{path}: world {doc['world']} with {len(doc['shards'])} shard entries")
    for r, entry in enumerate(doc["shards"]):
        _check_entry(path, doc, r, entry)
    return doc


def _check_entry(path: str, doc: dict, r: int, entry) -> None:
    where = f"{path}: shard entry {r}"
    for key, kind in (("rank", int), ("file", str), ("rows", int), ("bytes", int), ("crc32", str)):
        _field(entry, key, kind, where)
    name = os.path.basename(shard_path("", r, doc["world"]))
    if entry["rank"] != r or entry["file"] != name:  # files are never opened by a name read from disk
        raise ValueError(f"{where} names {entry['file']!r} (rank {entry['rank']}), expected {name!r}")
    want = expected_rows(doc["num_samples"], r, doc["world"])
    if entry["rows"] != want:
        raise ValueError(f"{where} lists {entry['rows']} rows; rank {r} of {doc['world']} holds {want} of "
                         f"{doc['num_samples']} rows")


def saved_dtype(doc: dict) -> torch.dtype:
    return _FROM_NAME[doc["dtype"]]


def _read_header(f, path: str, size: int) -> tuple[dict, dict, int]:
    """(metadata, the 'bank' entry, offset of the first row) of an open shard file."""
    if size < 8:
        raise ValueError(f"{path} is truncated: {size} bytes, less than the 8-byte header length")
    n = int.from_bytes(f.read(8), "little")
    if n > min(size - 8, _MAX_HEADER):
        raise ValueError(f"{path}: header length {n} does not fit the file ({size} bytes): truncated or not "
                         f"a bank shard")
    try:
        h = json.loads(f.read(n))
    except ValueError as e:
        raise ValueError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(h, dict) or not isinstance(h.get("bank"), dict) or set(h) - {"__metadata__", "bank"}:
        keys = sorted(h) if isinstance(h, dict) else type(h).__name__
        raise ValueError(f"{path}: the header must hold one tensor 'bank' and metadata, found {keys}")
    meta = h.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the header's __metadata__ is not a mapping")
    return meta, h["bank"], 8 + n


def _check_layout(path: str, entry: dict, start: int, size: int, rows: int, classes: int) -> torch.dtype:
    """The dtype of a shard whose header describes [rows, classes] values filling the file exactly."""
    name = entry.get("dtype")
    if name not in _FROM_NAME:
        raise ValueError(f"{path}: unknown dtype {name!r} (a bank shard holds one of {sorted(_FROM_NAME)})")
    dtype = _FROM_NAME[name]
    if entry.get("shape") != [rows, classes]:
        raise ValueError(f"{path}: rows of shape {entry.get('shape')}, expected [{rows}, {classes}] (this "
                         f"shard's rows of the saved bank, by the manifest)")
    nbytes = rows * classes * dtype.itemsize
    if entry.get("data_offsets") != [0, nbytes]:
        raise ValueError(f"{path}: data_offsets {entry.get('data_offsets')}, expected [0, {nbytes}] for "
                         f"[{rows}, {classes}] {name}")
    if size != start + nbytes:
        what = "truncated" if size < start + nbytes else f"{size - start - nbytes} trailing bytes"
        raise ValueError(f"{path}: {size} bytes, its header describes {start + nbytes} ({what})")
    return dtype


def _check_meta(path: str, meta: dict, doc: dict, r: int, dtype_name: str) -> None:
    """The shard belongs to the save the manifest commits, as its rank ``r``."""
    if meta.get("save_id") != doc["save_id"]:
        raise ValueError(f"{path} belongs to save {meta.get('save_id')!r}, but {INDEX} commits save "
                         f"{doc['save_id']!r}: an interrupted save, or files of two saves mixed; save again")
    want = {"world": str(doc["world"]), "rank": str(r), "num_samples": str(doc["num_samples"]),
            "num_classes": str(doc["num_classes"])}
    for key, value in want.items():
        if meta.get(key) != value:
            raise ValueError(f"{path}: metadata {key}={meta.get(key)!r}, the manifest says {value!r}")
    if dtype_name != doc["dtype"]:
        raise ValueError(f"{path} holds {dtype_name} rows, the manifest says {doc['dtype']}")


def stream_rows(shard: ShardFile):
    """Yields (first row, rows chunk) of an open shard; the chunk buffer is reused."""
    n, c, dtype = shard.rows, shard.classes, shard.dtype
    step = max(1, CHUNK_BYTES // max(1, c * dtype.itemsize))
    buf = torch.empty(min(step, max(n, 1)), c, dtype=dtype)
    raw = buf.view(torch.uint8).numpy().reshape(-1)
    shard.handle.seek(shard.start)
    for k in range(0, n, step):
        m = min(step, n - k)
        view = memoryview(raw)[: m * c * dtype.itemsize]
        if shard.handle.readinto(view) != len(view):
            raise ValueError(f"{shard.path} is truncated (it changed while being read)")
        yield k, buf[:m]


def _verify_contents(shard: ShardFile, want_crc: str, saved_world: int, layout: Layout, num_classes: int) -> None:
    """One streaming pass: the CRC-32 of the whole file, and every value by the layout's rule."""
    shard.handle.seek(0)
    crc, bad = zlib.crc32(shard.handle.read(shard.start)), None
    for k, chunk in stream_rows(shard):
        crc = zlib.crc32(chunk.view(torch.uint8).numpy(), crc)
        wrong = layout.bad_values(chunk, num_classes)
        if bad is None and bool(wrong.any()):
            i, j = (int(x) for x in wrong.nonzero()[0])
            bad = (shard.rank + saved_world * (k + i), j, float(chunk[i, j]))
    if f"{crc:08x}" != want_crc:
        raise ValueError(f"{shard.path}: checksum crc32 {crc:08x}, the manifest says {want_crc}: the file is "
                         f"corrupted")
    if bad is not None:
        what = "class" if layout.k is None else "column"
        rule = ("finite and > 0" if layout.k is None else "class ids whole, distinct, in [0, C); values "
                "finite and > 0, rest and bound finite and >= 0, all within float32")
        raise ValueError(f"{shard.path}: row {bad[0]} holds {bad[2]} in {what} {bad[1]}; {rule}")


def open_shard(folder: str, doc: dict, r: int) -> ShardFile:
    """Opens and verifies shard ``r`` of the save ``doc`` commits; the caller closes it."""
    path, entry = shard_path(folder, r, doc["world"]), doc["shards"][r]
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {INDEX} commits save {doc['save_id']!r} of "
                                f"{doc['world']} shards") from None
    try:
        size = os.fstat(f.fileno()).st_size
        meta, header, start = _read_header(f, path, size)
        layout = layout_of(doc, manifest_path(folder))
        columns = layout.columns(doc["num_classes"])
        dtype = _check_layout(path, header, start, size, entry["rows"], columns)
        _check_meta(path, meta, doc, r, header["dtype"])
        if size != entry["bytes"]:
            raise ValueError(f"{path}: {size} bytes, the manifest says {entry['bytes']}")
        shard = ShardFile(path, f, r, entry["rows"], columns, dtype, start)
        _verify_contents(shard, entry["crc32"], doc["world"], layout, doc["num_classes"])
        return shard
    except BaseException:
        f.close()
        raise


def files_to_read(saved_world: int, rank: int, world: int, strided: bool) -> list[int]:
    """The saved shards holding rows of ``rank``: all for a replica; for a shard of a world of
    ``world``, those whose ids r + saved_world*k can be = rank (mod world)."""
    g = math.gcd(saved_world, world)
    return [r for r in range(saved_world) if not strided or r % g == rank % g]


def close_all(shards: list[ShardFile]) -> None:
    for s in shards:
        s.handle.close()


def open_save(folder: str, num_samples: int, num_classes: int, dtype: torch.dtype, rank: int, world: int,
              strided: bool, layout: Layout = Layout()) -> tuple[dict, list[ShardFile]]:
    """Reads and verifies every file that ``rank`` needs; writes nothing. Raises ValueError or
    FileNotFoundError naming the file and the problem. The returned shards are open."""
    doc = read_manifest(folder, num_samples, num_classes)
    saved = layout_of(doc, manifest_path(folder))
    if saved.k != layout.k:
        raise ValueError(f"{manifest_path(folder)}: the save holds {saved.describe()}, expected "
                         f"{layout.describe()}")
    if layout.values is not None and _FROM_NAME[layout.values] not in _EXACT_INTO[saved.values]:
        raise ValueError(f"{manifest_path(folder)}: the save holds {saved.values} top-k values, this bank keeps "
                         f"{layout.values}, which would round them; create the loss with "
                         f"bank_dtype={_FROM_NAME[saved.values]}")
    if layout.k is not None and doc["dtype"] not in ("F32", "F64"):
        raise ValueError(f"{manifest_path(folder)}: a top-k save holds F32 or F64 rows, this one {doc['dtype']}")
    if layout.k is not None and doc["dtype"] == "F32" and num_classes > 2 ** 24:
        raise ValueError(f"{manifest_path(folder)}: F32 rows cannot hold the class ids of {num_classes} classes")
    if layout.k is None and dtype not in _EXACT_INTO[doc["dtype"]]:
        raise ValueError(f"{manifest_path(folder)}: the save holds {doc['dtype']} rows, this bank is {dtype}, "
                         f"which would round them; create the loss with bank_dtype={saved_dtype(doc)}")
    shards = []
    try:
        for r in files_to_read(doc["world"], rank, world, strided):
            shards.append(open_shard(folder, doc, r))
    except BaseException:
        close_all(shards)
        raise
    return doc, shards


def copy_rows(shards: list[ShardFile], saved_world: int, storage: torch.Tensor | None, rank: int, world: int,
              strided: bool, write=None) -> None:
    """Writes verified rows into ``storage``: rows rank, rank + world, ... (``strided``) or all;
    or hands each chunk to ``write(local positions, rows)``."""
    for s in shards:
        for k, chunk in stream_rows(s):
            ids = s.rank + saved_world * torch.arange(k, k + chunk.shape[0])
            if strided:
                mine = ids % world == rank
                ids, chunk = ids[mine] // world, chunk[mine]
            if write is not None:
                write(ids, chunk)
            else:
                storage.index_copy_(0, ids.to(storage.device), chunk.to(storage.device, storage.dtype))


def load_rows(folder: str, storage: torch.Tensor, num_samples: int, rank: int, world: int, strided: bool) -> None:
    """One process: verifies, then fills ``storage`` (see :func:`open_save`, :func:`copy_rows`)."""
    doc, shards = open_save(folder, num_samples, storage.shape[1], storage.dtype, rank, world, strided)
    try:
        copy_rows(shards, doc["world"], storage, rank, world, strided)
    finally:
        close_all(shards)

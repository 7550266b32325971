"""The DPS posterior as a dataset of soft labels, in the safetensors format.

:func:`export_soft_labels` writes each sample's posterior mean t = alpha / alpha0
(dense [N, C], or its k largest masses plus the remainder, as FKD and ReLabel store
ImageNet soft labels), the row mass alpha0 and the given labels, with metadata (N, C,
gamma, c, eps, the epoch). :func:`load_soft_labels` reads it back as soft targets for
``soft_cross_entropy`` (distillation) or as a prior for ``DPSLoss(prior=...)``.

The file is plain safetensors (8-byte little-endian header length, a JSON header
with each tensor's dtype, shape and data offsets plus string ``__metadata__``, then
the raw bytes), written and read here without the ``safetensors`` package; the tests
read it back with that package. The bank is processed in chunks of rows: memory is
O(chunk * C), whatever N.

Tensors: ``targets`` [N, C] (dense), or ``topk_values`` [N, k], ``topk_indices``
[N, k] (int16 when C <= 32767, else int32) and ``remainder`` [N] = 1 - sum of the
stored values, spread evenly over the other C - k classes on loading (so every loaded
row sums to 1); ``alpha0`` [N], always float32 whatever the masses' dtype (float16
would overflow to inf above 65504, bfloat16 would keep 3 significant digits);
``given_labels`` [N] (int16 or int32) when known.

Loading checks the whole file before returning anything (:func:`read_safetensors`, then
:class:`SoftLabels`): the layout (header length and JSON, known dtypes, each tensor's
offsets matching its shape, within the file, without gaps or overlaps, the file size)
and the values (masses finite and >= 0 with rows summing to 1, top-k class ids in
[0, C) and distinct per row, alpha0 finite and > 0, given labels in [0, C)). Every
error is one line that names the file and the problem.
"""
from __future__ import annotations

import json
import math
import os
import struct

import torch

from ._validate import readout_index
from .label_issues import DEFAULT_CHUNK_ROWS, _Source
from .metrics import row_sum_tolerance

FORMAT = "dps-soft-labels/1"
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8"}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The row mass alpha0 (the prior's mass plus the evidence of every update) exceeds
# float16's 65504 in long or large-c runs: float32 holds it to 3.4e38, with 7 digits.
ALPHA0_DTYPE = torch.float32


def _index_dtype(num_classes: int) -> torch.dtype:
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32


def _layout(n: int, c: int, top_k, dtype, with_labels: bool) -> list:
    """[(name, dtype, shape)] in file order."""
    if top_k is None:
        specs = [("targets", dtype, [n, c])]
    else:
        specs = [("topk_values", dtype, [n, top_k]), ("topk_indices", _index_dtype(c), [n, top_k]),
                 ("remainder", dtype, [n])]
    specs.append(("alpha0", ALPHA0_DTYPE, [n]))
    if with_labels:
        specs.append(("given_labels", _index_dtype(c), [n]))
    return specs


def _header(specs: list, meta: dict) -> tuple[bytes, dict]:
    """The safetensors header (padded to 8 bytes) and each tensor's absolute file offset."""
    entries, pos = {}, 0
    for name, dt, shape in specs:
        size = dt.itemsize
        for s in shape:
            size *= s
        entries[name] = {"dtype": _ST_DTYPES[dt], "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    entries["__metadata__"] = {k: str(v) for k, v in meta.items()}
    head = json.dumps(entries, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    base = 8 + len(head)
    return struct.pack("<Q", len(head)) + head, {k: base + v["data_offsets"][0] for k, v in entries.items()
                                                  if k != "__metadata__"}


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _chunk_tensors(rows: torch.Tensor, top_k, dtype) -> dict:
    a = rows.float()
    a0 = a.sum(1)
    t = a / a0[:, None]
    out = {"alpha0": a0.to(ALPHA0_DTYPE)}
    if top_k is None:
        out["targets"] = t.to(dtype)
    else:
        vals, idx = t.topk(top_k, dim=1)
        vals = vals.to(dtype)
        out["topk_values"], out["topk_indices"] = vals, idx
        # from the stored (rounded) values, so that only the remainder's own rounding is lost
        out["remainder"] = (1.0 - vals.float().sum(1)).clamp_min(0.0).to(dtype)
    return out


def _resolve(source, name, value):
    v = value if value is not None else getattr(source, name, None)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def export_soft_labels(source, path: str, top_k: int | None = None, dtype: torch.dtype = torch.float16, *,
                       given_labels=None, epoch: int | None = None, c: float | None = None,
                       eps: float | None = None, gamma: float | None = None,
                       chunk_rows: int = DEFAULT_CHUNK_ROWS, metadata: dict | None = None) -> dict:
    """Writes the posterior of ``source`` (a ``DPSLoss``, a bank tensor [N, C], or a
    single-process object with ``iter_rows`` and ``num_samples``/``num_classes``) to
    ``path`` (safetensors, written atomically).

    ``top_k``: None for dense rows, or k in [1, C] for the k largest masses plus the
    remainder. ``dtype``: float16 (default), bfloat16 or float32 for the masses.
    ``c``, ``eps``, ``gamma`` default to the source's attributes; they, ``epoch`` and
    ``metadata`` (str -> str) go into the header. Returns {path, bytes, bytes_per_sample}.
    """
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"dtype must be one of {VALUE_DTYPES}, got {dtype}")
    src = _Source(source, given_labels, require_labels=False)
    if src.world > 1:
        raise ValueError(_distributed_message(source, src.world, path))
    n = src.num_rows if src.num_rows is not None else getattr(source, "num_samples", None)
    n_cls = src.num_classes if src.num_classes is not None else getattr(source, "num_classes", None)
    if not isinstance(n, int) or not isinstance(n_cls, int):
        raise ValueError("cannot tell N and C of this source: give a bank tensor or set num_samples/num_classes")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_cls):
        raise ValueError(f"top_k must be None or an int in [1, {n_cls}], got {top_k!r}")
    if src.labels is not None and src.labels.shape[0] != n:
        raise ValueError(f"given_labels has {src.labels.shape[0]} entries for {n} rows")
    meta = {"format": FORMAT, "N": n, "C": n_cls, "top_k": top_k if top_k is not None else "dense",
            "dtype": str(dtype).replace("torch.", ""), "gamma": _resolve(source, "gamma", gamma),
            "c": _resolve(source, "c", c), "eps": _resolve(source, "eps", eps), "epoch": epoch,
            **(metadata or {})}
    specs = _layout(n, n_cls, top_k, dtype, src.labels is not None)
    head, offsets = _header(specs, meta)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        _write_rows(tmp, head, specs, offsets, src, top_k, dtype, chunk_rows, n, path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    size = os.path.getsize(path)
    return {"path": path, "bytes": size, "bytes_per_sample": (size - len(head)) / max(1, n)}


def _distributed_message(source, world: int, path: str) -> str:
    """Why a distributed bank is refused, in the words of its own kind."""
    kind = getattr(source, "mode", None) or getattr(getattr(source, "store", None), "kind", None)
    if kind == "replicated":
        how = ("every rank holds the whole bank but iter_rows gives each rank only its share: export "
               "loss.full_bank() (no collective) on one rank")
    else:
        how = ("each rank holds only its rows: export loss.full_bank() (a collective, call it on every "
               "rank) from one rank, or each rank's rows to its own file")
    return (f"{path}: export_soft_labels writes one file from one process; this is a {kind or 'distributed'} "
            f"bank over {world} ranks: {how}")


def _check_bank_rows(rows: torch.Tensor, ids: torch.Tensor, path: str) -> None:
    """A row must be a valid Dirichlet parameter (finite, >= 0, mass > 0 in float32),
    or its mean would be written as NaN or inf, which no loader accepts."""
    a = rows.float()
    bad = ~torch.isfinite(a).all(1) | (a < 0).any(1) | ~(a.sum(1) > 0) | ~torch.isfinite(a.sum(1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{path}: bank row {int(ids[i])} is not a Dirichlet parameter (finite, >= 0, with a "
                         f"finite float32 mass > 0): min {float(a[i].min()):.6g}, max {float(a[i].max()):.6g}, "
                         f"mass {float(a[i].sum()):.6g}; nothing was written")


def _compressed_chunk_tensors(kid: torch.Tensor, vals: torch.Tensor, rest: torch.Tensor, top_k: int, dtype) -> dict:
    """_chunk_tensors of a top-k bank's rows, read from (ids, values, rest): the implied dense
    row's top_k <= k largest masses are among the kept ones (kept values are at least the
    uniform level of the others, docs/method.md §12), so no [rows, C] row is formed."""
    a0 = vals.sum(1) + rest
    t, order = (vals / a0[:, None]).topk(top_k, dim=1)
    t = t.to(dtype)
    return {"alpha0": a0.to(ALPHA0_DTYPE), "topk_values": t, "topk_indices": kid.gather(1, order),
            "remainder": (1.0 - t.float().sum(1)).clamp_min(0.0).to(dtype)}


def _chunks(src, top_k, dtype, chunk_rows, path):
    """(ids, the chunk's tensors), from a top-k bank's compressed rows where they hold the
    export's top_k (a 14.2M x 21,841 bank in chunks of a few MB instead of rows x C floats),
    else from dense rows."""
    store = getattr(src.source, "store", None)
    compressed = getattr(store, "iter_compressed", None)
    if compressed is not None and top_k is not None and top_k <= store.ids.shape[1]:
        for ids, kid, vals, rest in compressed(chunk_rows):
            _check_bank_rows(torch.cat([vals, rest[:, None]], 1), ids, path)
            yield ids, _compressed_chunk_tensors(kid, vals.float(), rest.float(), top_k, dtype)
        return
    for ids, rows in src.iter_rows(chunk_rows):
        _check_bank_rows(rows, ids, path)
        yield ids, _chunk_tensors(rows, top_k, dtype)


def _write_rows(tmp, head, specs, offsets, src, top_k, dtype, chunk_rows, n, path) -> None:
    written = 0
    with open(tmp, "wb") as f:
        f.write(head)
        for ids, parts in _chunks(src, top_k, dtype, chunk_rows, path):
            if len(ids) == 0:
                continue
            start = int(ids[0])
            if int(ids[-1]) - start + 1 != len(ids):
                raise ValueError("export_soft_labels needs each chunk of iter_rows to be consecutive ids")
            if src.labels is not None:
                parts["given_labels"] = src.given(ids.cpu())
            for name, dt, shape in specs:
                row_bytes = dt.itemsize * (shape[1] if len(shape) > 1 else 1)
                f.seek(offsets[name] + start * row_bytes)
                f.write(_raw(parts[name].to(dt)))
            written += len(ids)
    if written != n:
        raise ValueError(f"the source yielded {written} rows, expected {n}")


# The safetensors reference reader refuses headers over 100 MB (MAX_HEADER_SIZE); a
# length beyond it is a corrupt or foreign file, not a header to allocate.
_MAX_HEADER_BYTES = 100_000_000


def read_safetensors(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; tensors are CPU copies. The layout is
    checked first (header length and JSON, string metadata, known dtypes, offsets that
    match each shape, lie in the file and tile its data without gaps or overlaps);
    every error is one line naming ``path``."""
    raw = _read_bytes(path)
    header, base = _parse_header(raw, path)
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings, got {str(meta)[:200]}")
    layout = {name: _tensor_layout(name, e, path) for name, e in header.items()}
    _check_tiling(layout, len(raw) - base, path)
    out = {}
    for name, (dt, shape, lo, hi) in layout.items():
        if hi == lo:  # no elements (the shape has a 0): nothing to read, nothing uninitialised
            out[name] = torch.zeros(shape, dtype=dt)
            continue
        t = torch.frombuffer(bytearray(raw[base + lo:base + hi]), dtype=torch.uint8)
        out[name] = t.view(dt).reshape(shape)
    return out, meta


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such soft-label file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a safetensors file") from None


def _parse_header(raw: bytes, path: str) -> tuple[dict, int]:
    """The header's JSON object and the offset of the data after it."""
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file ({len(raw)} bytes, shorter than the 8-byte header length)")
    (hlen,) = struct.unpack("<Q", raw[:8])
    if hlen > _MAX_HEADER_BYTES:
        raise ValueError(f"{path}: header length {hlen} exceeds the safetensors limit of {_MAX_HEADER_BYTES} bytes")
    if 8 + hlen > len(raw):
        raise ValueError(f"{path}: header length {hlen} runs past the end of the file ({len(raw)} bytes): "
                         f"truncated, or not a safetensors file")
    try:
        header = json.loads(raw[8:8 + hlen].decode("utf-8"), object_pairs_hook=_unique_keys)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError and duplicate names are all ValueErrors
        raise ValueError(f"{path}: the header is not valid JSON: {' '.join(str(e).split())}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header must be a JSON object, got {type(header).__name__}")
    return header, 8 + hlen


def _unique_keys(pairs: list) -> dict:
    """json.loads keeps the last of two equal names silently: two tensors of one name
    would hide one of them."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the name {k!r} appears twice")
        out[k] = v
    return out


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tensor_layout(name: str, e, path: str) -> tuple:
    """(dtype, shape, start, end) of one header entry, with its byte count checked."""
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
        raise ValueError(f"{path}: tensor {name!r} needs dtype, shape and data_offsets, got {str(e)[:200]}")
    if e["dtype"] not in _FROM_ST:
        raise ValueError(f"{path}: tensor {name!r} has unknown dtype {e['dtype']!r} (known: {sorted(_FROM_ST)})")
    shape, offsets = e["shape"], e["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise ValueError(f"{path}: tensor {name!r} has shape {shape!r}, not a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise ValueError(f"{path}: tensor {name!r} has data_offsets {offsets!r}, not [start, end] with "
                         f"0 <= start <= end")
    dt = _FROM_ST[e["dtype"]]
    size = dt.itemsize * math.prod(shape)
    if offsets[1] - offsets[0] != size:
        raise ValueError(f"{path}: tensor {name!r} ({e['dtype']} {shape}) needs {size} bytes, but its "
                         f"data_offsets {offsets} hold {offsets[1] - offsets[0]}")
    return dt, shape, offsets[0], offsets[1]


def _check_tiling(layout: dict, data_bytes: int, path: str) -> None:
    """The tensors' byte ranges must lie in the file and cover its data exactly once
    (the safetensors rule): a range past the end is a truncated file, an overlap would
    read one tensor's bytes as another's, a gap or trailing bytes a corrupt header."""
    for name, (_, _, lo, hi) in layout.items():
        if hi > data_bytes:
            raise ValueError(f"{path}: tensor {name!r} has data_offsets [{lo}, {hi}] past the end of the data "
                             f"({data_bytes} bytes after the header): the file is truncated or its header wrong")
    pos, prev = 0, None
    for name, (_, _, lo, hi) in sorted(layout.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if lo != pos:
            what = f"overlaps tensor {prev!r}" if lo < pos else f"leaves bytes [{pos}, {lo}) unused"
            raise ValueError(f"{path}: tensor {name!r} at data_offsets [{lo}, {hi}] {what}")
        pos, prev = hi, name
    if pos != data_bytes:
        raise ValueError(f"{path}: {data_bytes - pos} bytes follow the last tensor's data (the header "
                         f"describes {pos} of {data_bytes})")


# Rows of masses are checked in float64 a chunk at a time: 4M elements is 32 MB.
_CHECK_ELEMENTS = 1 << 22


def _read_sizes(meta: dict, path: str) -> tuple:
    """(N, C, top_k) from the metadata: N >= 0, C >= 1, top_k None ("dense") or in [1, C]."""
    try:
        n, c = int(meta["N"]), int(meta["C"])
        k = None if meta["top_k"] == "dense" else int(meta["top_k"])
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{path}: the metadata must give integers N, C and top_k (or top_k 'dense'), got "
                         f"N={meta.get('N')!r}, C={meta.get('C')!r}, top_k={meta.get('top_k')!r}") from None
    if n < 0 or c < 1 or (k is not None and not 1 <= k <= c):
        raise ValueError(f"{path}: the metadata needs N >= 0, C >= 1 and top_k in [1, C], got N={n}, C={c}, "
                         f"top_k={k}")
    return n, c, k


def _check_soft_tensors(t: dict, n: int, c: int, k, path: str) -> None:
    """Every tensor the metadata implies, with its shape and kind of dtype; then the
    values, a chunk of rows at a time (at most _CHECK_ELEMENTS in float64 beyond the
    file's own memory)."""
    want = {"targets": [n, c]} if k is None else {"topk_values": [n, k], "topk_indices": [n, k], "remainder": [n]}
    want["alpha0"] = [n]
    missing = [name for name in want if name not in t]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}")
    if "given_labels" in t:
        want["given_labels"] = [n]
    for name, shape in want.items():
        if list(t[name].shape) != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {list(t[name].shape)}, but the metadata "
                             f"(N={n}, C={c}, top_k={k or 'dense'}) gives {shape}")
        integer = name in ("topk_indices", "given_labels")
        if t[name].is_floating_point() == integer:
            raise ValueError(f"{path}: tensor {name!r} must hold {'integers' if integer else 'floats'}, "
                             f"got {t[name].dtype}")
    step = max(1, _CHECK_ELEMENTS // (c if k is None else k))
    for lo in range(0, n, step):
        _check_rows(t, slice(lo, lo + step), lo, c, k, path)


def _check_rows(t: dict, rows: slice, first: int, c: int, k, path: str) -> None:
    if k is None:
        _check_masses(t["targets"][rows], None, first, c, path)
    else:
        _check_masses(t["topk_values"][rows], t["remainder"][rows], first, c, path)
        _check_ids(t["topk_indices"][rows], "topk_indices", first, c, path, distinct=True)
    a0 = t["alpha0"][rows]
    hint = (" (float16 alpha0 overflows above 65504; files written since store it in float32: export again)"
            if a0.dtype == torch.float16 else "")
    a0 = a0.float()  # as SoftLabels keeps it
    _refuse(~(torch.isfinite(a0) & (a0 > 0)), first, path, "alpha0",
            lambda i: f"is {float(a0[i])}, not a finite mass > 0{hint}")
    if "given_labels" in t:
        _check_ids(t["given_labels"][rows][:, None], "given_labels", first, c, path, distinct=False)


def _check_masses(vals: torch.Tensor, remainder, first: int, c: int, path: str) -> None:
    """Posterior means: finite, >= 0, and each row (with its top-k remainder) summing
    to 1 within the rounding of the stored dtype (metrics.row_sum_tolerance)."""
    name = "targets" if remainder is None else "topk_values"
    parts = [(name, vals.double())]
    if remainder is not None:
        parts.append(("remainder", remainder.double()[:, None]))
    for what, x in parts:
        _refuse(~torch.isfinite(x).all(1), first, path, what, lambda i: "holds NaN or inf")
        _refuse((x < 0).any(1), first, path, what, lambda i: f"holds the negative mass {float(x[i].min()):.6g}")
    total = sum(x.sum(1) for _, x in parts)
    tol = row_sum_tolerance(vals.dtype, c)
    what = name if remainder is None else "topk_values + remainder"
    _refuse((total - 1).abs() > tol, first, path, what,
            lambda i: f"sums to {float(total[i]):.6g}, more than {tol:.2g} from 1 (the tolerance of "
                      f"{str(vals.dtype).replace('torch.', '')} at C = {c})")


def _check_ids(ids: torch.Tensor, what: str, first: int, c: int, path: str, distinct: bool) -> None:
    x = ids.long()
    out = (x < 0) | (x >= c)
    _refuse(out.any(1), first, path, what, lambda i: f"holds the class id {int(x[i][out[i]][0])}, outside [0, {c})")
    if distinct and x.shape[1] > 1:  # a repeated id would let one stored mass overwrite another
        s = x.sort(1).values
        _refuse((s[:, 1:] == s[:, :-1]).any(1), first, path, what, lambda i: "repeats a class id")


def _refuse(bad: torch.Tensor, first: int, path: str, what: str, describe) -> None:
    """Raises for the first row of a chunk where ``bad`` holds; ``describe(i)`` says what
    is wrong with the chunk's row i."""
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{path}: {what} row {first + i} {describe(i)}")


class SoftLabels:
    """Soft labels read back from :func:`export_soft_labels`.

    ``targets(index)``: float32 rows summing to 1 (for ``soft_cross_entropy``; the
    rounding of 16-bit masses is renormalised away);
    ``prior(concentration, index)``: a strictly positive Dirichlet prior for
    ``DPSLoss(prior=...)``; ``given_labels``, ``alpha0`` and ``meta`` as stored.
    Top-k files are densified only for the rows asked for."""

    def __init__(self, tensors: dict, meta: dict, path: str = "?"):
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a dps_fast soft-label file (format {meta.get('format')!r})")
        self.meta, self.path = meta, path
        self.num_samples, self.num_classes, self.top_k = _read_sizes(meta, path)
        _check_soft_tensors(tensors, self.num_samples, self.num_classes, self.top_k, path)
        self._t = tensors
        self.alpha0 = tensors["alpha0"].float()
        self.given_labels = tensors["given_labels"].long() if "given_labels" in tensors else None

    def targets(self, index=None) -> torch.Tensor:
        """Rows ``index`` (ids or a bool mask [N], the read-out rule of
        :func:`dps_fast._validate.readout_index`), or all rows."""
        ids = None if index is None else readout_index(index, self.num_samples).cpu()
        sel = (lambda t: t) if ids is None else (lambda t: t[ids])
        if self.top_k is None:
            out = sel(self._t["targets"]).float()
        else:
            vals, idx = sel(self._t["topk_values"]).float(), sel(self._t["topk_indices"]).long()
            spread = sel(self._t["remainder"]).float() / max(1, self.num_classes - self.top_k)
            out = spread[:, None].expand(len(vals), self.num_classes).clone().scatter_(1, idx, vals)
        return out / out.sum(1, keepdim=True)  # rows stored in 16 bits sum to 1 within ~1e-3

    def prior(self, concentration: float | None = None, index=None, floor: float = 1e-6) -> torch.Tensor:
        """targets * mass: the stored alpha0 (the bank as it was, to the stored precision)
        or ``concentration``; masses below ``floor * mass`` (rounded to 0, or outside a
        top-k) are raised to it, as the Dirichlet needs every alpha > 0."""
        t = self.targets(index)
        if concentration is None:
            mass = self.alpha0 if index is None else self.alpha0[readout_index(index, self.num_samples).cpu()]
            mass = mass[:, None]
        else:
            if not concentration > 0:
                raise ValueError(f"concentration must be > 0, got {concentration}")
            mass = torch.full((len(t), 1), float(concentration))
        return torch.maximum(t * mass, floor * mass)


def load_soft_labels(path: str) -> SoftLabels:
    """Reads a file written by :func:`export_soft_labels`."""
    tensors, meta = read_safetensors(path)
    return SoftLabels(tensors, meta, path)

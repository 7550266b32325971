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
row sums to 1); ``alpha0`` [N]; ``given_labels`` [N] (int16 or int32) when known.
"""
from __future__ import annotations

import json
import os
import struct

import torch

from .label_issues import DEFAULT_CHUNK_ROWS, _Source

FORMAT = "dps-soft-labels/1"
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8"}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _index_dtype(num_classes: int) -> torch.dtype:
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32


def _layout(n: int, c: int, top_k, dtype, with_labels: bool) -> list:
    """[(name, dtype, shape)] in file order."""
    if top_k is None:
        specs = [("targets", dtype, [n, c])]
    else:
        specs = [("topk_values", dtype, [n, top_k]), ("topk_indices", _index_dtype(c), [n, top_k]),
                 ("remainder", dtype, [n])]
    specs.append(("alpha0", dtype, [n]))
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
    out = {"alpha0": a0.to(dtype)}
    if top_k is None:
        out["targets"] = t.to(dtype)
    else:
        vals, idx = t.topk(top_k, dim=1)
        vals = vals.to(dtype)
        out["topk_values"], out["topk_indices"] = vals, idx.to(_index_dtype(t.shape[1]))
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
        raise ValueError("export_soft_labels writes one file from one process: on a sharded bank, export "
                         "full_bank() on one rank (or each rank's rows to its own file)")
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
        _write_rows(tmp, head, specs, offsets, src, top_k, dtype, chunk_rows, n)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    size = os.path.getsize(path)
    return {"path": path, "bytes": size, "bytes_per_sample": (size - len(head)) / max(1, n)}


def _write_rows(tmp, head, specs, offsets, src, top_k, dtype, chunk_rows, n) -> None:
    written = 0
    with open(tmp, "wb") as f:
        f.write(head)
        for ids, rows in src.iter_rows(chunk_rows):
            if len(ids) == 0:
                continue
            start = int(ids[0])
            if int(ids[-1]) - start + 1 != len(ids):
                raise ValueError("export_soft_labels needs each chunk of iter_rows to be consecutive ids")
            parts = _chunk_tensors(rows, top_k, dtype)
            if src.labels is not None:
                parts["given_labels"] = src.given(ids.cpu()).to(_index_dtype(rows.shape[1]))
            for name, dt, shape in specs:
                row_bytes = dt.itemsize * (shape[1] if len(shape) > 1 else 1)
                f.seek(offsets[name] + start * row_bytes)
                f.write(_raw(parts[name]))
            written += len(ids)
    if written != n:
        raise ValueError(f"the source yielded {written} rows, expected {n}")


def read_safetensors(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; tensors are CPU copies."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (hlen,) = struct.unpack("<Q", raw[:8])
    if 8 + hlen > len(raw):
        raise ValueError(f"{path}: header length {hlen} runs past the end of the file")
    header = json.loads(raw[8:8 + hlen])
    meta = header.pop("__metadata__", {}) or {}
    base, out = 8 + hlen, {}
    for name, e in header.items():
        if e["dtype"] not in _FROM_ST:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {e['dtype']}")
        lo, hi = e["data_offsets"]
        dt = _FROM_ST[e["dtype"]]
        if hi == lo:
            out[name] = torch.empty(e["shape"], dtype=dt)
            continue
        t = torch.frombuffer(bytearray(raw[base + lo:base + hi]), dtype=torch.uint8)
        out[name] = t.view(dt).reshape(e["shape"])
    return out, meta


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
        self.num_samples, self.num_classes = int(meta["N"]), int(meta["C"])
        self.top_k = None if meta["top_k"] == "dense" else int(meta["top_k"])
        need = ("targets",) if self.top_k is None else ("topk_values", "topk_indices", "remainder")
        missing = [k for k in need + ("alpha0",) if k not in tensors]
        if missing:
            raise ValueError(f"{path}: missing tensors {missing}")
        self._t = tensors
        self.alpha0 = tensors["alpha0"].float()
        self.given_labels = tensors["given_labels"].long() if "given_labels" in tensors else None

    def targets(self, index=None) -> torch.Tensor:
        sel = (lambda t: t) if index is None else (lambda t: t[torch.as_tensor(index, dtype=torch.long)])
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
            mass = self.alpha0 if index is None else self.alpha0[torch.as_tensor(index, dtype=torch.long)]
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

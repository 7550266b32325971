"""Reference implementation of docs/method.md, in plain PyTorch.

This module is the oracle every fused backend is tested against, and the
fallback for devices and dtypes the fused kernels do not cover. It computes in
float32 (float64 when an input is float64) whatever the storage dtype, and it
follows docs/method.md literally. It does not validate its inputs: the public API in
:mod:`dps_fast.functional` does that once, for every backend.
"""
from __future__ import annotations

import torch

from .ops import dps_cross_entropy as _dce
from .ops import soft_cross_entropy as _sce
from .ops import supcon as _sc


# --------------------------------------------------------------------------- docs/method.md §1
def init_prior(labels, num_classes: int, c: float = 100.0, eps: float = 1e-2,
               dtype: torch.dtype = torch.float32, device=None, pin_memory: bool = False) -> torch.Tensor:
    """Prior bank alpha [N, C]: c on the label, eps elsewhere.

    ``labels`` is an integer tensor [N], or a soft label matrix [N, C] (its
    argmax is used). The bank is built in place, a block of rows at a time, so the
    build needs memory for the result plus one block (``pin_memory``: in pinned
    host memory, for the host bank).
    """
    from . import _validate as checks

    checks.positive("c", c)
    checks.positive("eps", eps)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"bank dtype must be float32, bfloat16, float16 or float64, got {dtype}")
    labels = torch.as_tensor(labels)
    if labels.is_floating_point():
        if labels.dim() != 2 or labels.shape[1] != num_classes:
            raise ValueError(
                f"soft labels must have shape [N, {num_classes}], got {list(labels.shape)}"
            )
        labels = labels.argmax(1)
    elif labels.dtype == torch.bool or labels.dim() != 1:
        raise ValueError(f"labels must be an integer tensor [N] or soft labels [N, C], got "
                         f"{labels.dtype} {list(labels.shape)}")
    labels = labels.to(torch.int64)
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise IndexError(f"label {bad} is out of range for {num_classes} classes")
    stored = torch.tensor([float(c), float(eps)], dtype=dtype)
    if not bool((torch.isfinite(stored) & (stored > 0)).all()):
        raise ValueError(f"c={c} and eps={eps} must be finite and > 0 in the bank dtype {dtype}, where they "
                         f"become {stored.tolist()}; choose values that {dtype} can represent")
    device = labels.device if device is None else torch.device(device)
    alpha = torch.empty((labels.shape[0], num_classes), dtype=dtype, device=device, pin_memory=pin_memory)
    fill_prior_(alpha, labels, c, eps)
    return alpha


_PRIOR_BLOCK_ELEMS = 1 << 20  # 2 MB of bfloat16 a block (tests monkeypatch it to force several)


def fill_prior_(alpha: torch.Tensor, labels: torch.Tensor, c: float, eps: float) -> torch.Tensor:
    """Writes the prior into ``alpha`` [N, C] block by block of rows: eps everywhere, then c at
    each row's label (the same values as ``full`` + ``scatter_``, bit for bit). Not one
    ``scatter_`` over the bank: PyTorch's CPU ``scatter_`` of a scalar into bfloat16 allocates
    scratch twice the size of its input (a 1 GB bank peaked at 3.1 GB) and is slow; the
    ``index_fill_`` of one block's label entries allocates only their [rows] index."""
    n, num_classes = alpha.shape
    step = max(1, _PRIOR_BLOCK_ELEMS // max(1, num_classes))
    offsets = torch.arange(min(step, n), device=alpha.device) * num_classes
    flat = alpha.view(-1)  # alpha is contiguous: entry (i, y) is flat[i * C + y]
    for k in range(0, n, step):
        lab = labels[k:k + step].to(alpha.device)
        flat[k * num_classes:(k + lab.shape[0]) * num_classes].fill_(float(eps))
        flat.index_fill_(0, offsets[:lab.shape[0]] + (k * num_classes + lab), float(c))
    return alpha


# --------------------------------------------------------------------------- docs/method.md §2-§4
# The fused ops' references live with their ops (dps_fast/ops/<op>.py); this module is the
# one place to import the whole oracle from.
dps_cross_entropy = _dce.reference
soft_cross_entropy = _sce.reference
supcon_loss = _sc.reference
supcon_rows = _sc.rows


# --------------------------------------------------------------------------- read-outs
def _readout_chunk(a: torch.Tensor, lab: torch.Tensor | None) -> dict:
    a = a.to(torch.float64)
    a0 = a.sum(-1)
    t = a / a0[:, None]
    logt = torch.log(t.clamp_min(torch.finfo(torch.float64).tiny))
    entropy = -(t * logt).sum(-1)
    expected = -(t * (torch.digamma(a + 1) - torch.digamma(a0 + 1)[:, None])).sum(-1)
    out = {"mean": t, "alpha0": a0, "entropy": entropy, "expected_entropy": expected,
           "mutual_information": entropy - expected}
    if lab is not None:
        out["label_error"] = 1.0 - t.gather(1, lab.to(device=a.device, dtype=torch.int64)[:, None])[:, 0]
    return out


@torch.no_grad()
def posterior_readouts(alpha: torch.Tensor, labels: torch.Tensor | None = None, chunk_rows: int = 65536,
                       mean: bool = True) -> dict:
    """Read-outs of Dirichlet rows alpha [N, C] (docs/method.md, "Read-outs of the
    posterior"), in float64, ``chunk_rows`` rows at a time: scratch memory is O(chunk),
    the outputs are float32 (``mean`` [N, C] only when ``mean``)."""
    n, c = alpha.shape
    keys = ["alpha0", "entropy", "expected_entropy", "mutual_information"] + (["label_error"] if labels is not None
                                                                                else [])
    out = {k: torch.empty(n, dtype=torch.float32, device=alpha.device) for k in keys}
    if mean:
        out["mean"] = torch.empty(n, c, dtype=torch.float32, device=alpha.device)
    step = max(1, int(chunk_rows))
    for k in range(0, n, step):
        part = _readout_chunk(alpha[k:k + step], None if labels is None else labels[k:k + step])
        for name, dst in out.items():
            dst[k:k + step] = part[name]
    return out

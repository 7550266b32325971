"""The prior bank (docs/method.md §1): ``c`` on each sample's label, ``eps`` elsewhere.

Below the banks and the oracle alike: every bank kind builds its rows with it
(:mod:`dps_fast.banks`), and the label-issue read-outs recompute what it stores.
"""
from __future__ import annotations

import warnings

import torch

from . import _validate

# docs/method.md §1: the off-label prior mass eps * (C - 1) as a fraction of c. The default
# gives eps = 0.01 at C = 10 with c = 100, the values the defaults were tuned at (exactly:
# 9e-4 * 100 / 9 == 0.01 in float64), and keeps the label's share of the initial target at
# 1 / (1 + 9e-4) = 99.9% at any C; a fixed eps = 0.01 gives 91% at C = 1000 and 31% at
# C = 21,841.
DEFAULT_OFF_LABEL = 9e-4
# An explicit eps whose off-label mass exceeds this fraction of c warns (the label then starts
# with less than 1 / 1.1 = 91% of the target).
WARN_OFF_LABEL = 0.1


def prior_eps(num_classes: int, c: float, eps: float | None = None, off_label: float | None = None,
              warn: bool = False) -> float:
    """eps of the prior: ``eps`` when given (an explicit value wins; ``warn``: a warning when
    its off-label mass exceeds 10% of c), else ``off_label * c / (C - 1)`` (default off_label
    9e-4): the off-label mass scales with C."""
    _validate.positive("c", c)
    if eps is not None and off_label is not None:
        raise ValueError("give eps or off_label (the off-label mass as a fraction of c), not both")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    others = max(num_classes - 1, 1)  # C = 1: no other class; eps is then never used
    if eps is not None:
        eps = _validate.positive("eps", eps)
        share = eps * (num_classes - 1) / c
        if warn and share > WARN_OFF_LABEL:
            warnings.warn(f"dps_fast: the prior's off-label mass eps * (C - 1) = {eps * (num_classes - 1):.4g} is "
                          f"{share:.3g} of c = {c:g}: the initial target puts {100 / (1 + share):.0f}% on the label; "
                          f"give off_label= (a fraction of c, default {DEFAULT_OFF_LABEL:g}) instead of eps to "
                          f"scale eps with C (docs/method.md §1)", stacklevel=3)
        return eps
    share = DEFAULT_OFF_LABEL if off_label is None else _validate.positive("off_label", off_label)
    return share * c / others


# --------------------------------------------------------------------------- docs/method.md §1
def init_prior(labels, num_classes: int, c: float = 100.0, eps: float | None = None,
               dtype: torch.dtype = torch.float32, device=None, pin_memory: bool = False,
               off_label: float | None = None) -> torch.Tensor:
    """Prior bank alpha [N, C]: c on the label, eps elsewhere.

    ``labels`` is an integer tensor [N], or a soft label matrix [N, C] (its
    argmax is used). ``eps`` defaults to ``off_label * c / (C - 1)`` (off_label, the
    off-label mass as a fraction of c, default 9e-4: eps = 0.01 at C = 10, c = 100); an
    explicit ``eps`` wins (:func:`prior_eps`). The bank is built in place, a block of rows
    at a time, so the build needs memory for the result plus one block (``pin_memory``:
    in pinned host memory, for the host bank).
    """
    eps = prior_eps(num_classes, c, eps, off_label)
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

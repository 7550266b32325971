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


# --------------------------------------------------------------------------- docs/method.md §2-§4
# The fused ops' references live with their ops (dps_fast/ops/<op>.py); this module is the
# one place to import the whole oracle from.
dps_cross_entropy = _dce.reference
soft_cross_entropy = _sce.reference
supcon_loss = _sc.reference


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

"""Public functional API: validate -> dispatch -> backend.

The fused ops live one per module in :mod:`dps_fast.ops`; this module gathers their
public functions with the bank helpers (:func:`init_prior`, the read-outs). Losses are
returned in float32 (float64 for float64 inputs); gradients flow back in the logits' dtype.
"""
from __future__ import annotations

import torch

from .ops._common import in_backward_recompute
from .ops.dps_cross_entropy import dps_cross_entropy
from .ops.soft_cross_entropy import soft_cross_entropy
from .ops.supcon import supcon_loss
from .prior import init_prior

# the public function of every op module (dps_fast.ops.PUBLIC; tests/test_structure.py checks
# that none is missing here or in dps_fast/__init__.py)
__all__ = ["init_prior", "posterior_readouts", "readout_chunk_rows", "in_backward_recompute",
           "dps_cross_entropy", "soft_cross_entropy", "supcon_loss"]


# ---------------------------------------------------------------------------------- read-outs
# Scratch of posterior_readouts, in bytes, whatever C: chunks of 65,536 rows were 0.5 GB per
# float64 temporary at C = 1000. DPSLoss.posterior() of 100,000 x 1000 float32, one thread:
# 6.0 s CPU, peak RSS 1.04 -> 3.12 GB before; 3.2-4.0 s CPU, 1.04 -> 1.07 GB now. 8, 32 and
# 128 MiB ran alike within the noise of a shared machine; digamma is most of the time.
READOUT_SCRATCH_BYTES = 32 * 2 ** 20
_READOUT_TEMPS = 2  # float64 [rows, C] buffers per chunk: the rows (then the mean), one scratch


def readout_chunk_rows(num_classes: int, itemsize: int = 8, chunk_rows: int | None = None) -> int:
    """Rows per chunk of :func:`posterior_readouts`: as many as keep its float64 scratch
    within READOUT_SCRATCH_BYTES (at least one row), at most ``chunk_rows``."""
    rows = max(1, READOUT_SCRATCH_BYTES // (max(1, num_classes) * itemsize * _READOUT_TEMPS))
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
        rows = min(rows, chunk_rows)
    return rows


@torch.no_grad()
def posterior_readouts(alpha: torch.Tensor, labels: torch.Tensor | None = None, chunk_rows: int | None = None,
                       mean: bool = True) -> dict:
    """Read-outs of Dirichlet rows alpha [N, C] (docs/method.md, "Read-outs of the
    posterior"): ``alpha0``, ``entropy``, ``expected_entropy``, ``mutual_information``,
    ``label_error`` (with ``labels`` [N]) and ``mean`` [N, C] (when ``mean``), float32.

    Computed in float64 a chunk of rows at a time; the scratch is bounded in bytes
    (:data:`READOUT_SCRATCH_BYTES`, about two float64 buffers of the chunk) at any C;
    ``chunk_rows`` caps the rows per chunk. Matches :func:`dps_fast.reference.posterior_readouts`."""
    n, c = alpha.shape
    keys = ["alpha0", "entropy", "expected_entropy", "mutual_information"] + ([] if labels is None else ["label_error"])
    out = {k: torch.empty(n, dtype=torch.float32, device=alpha.device) for k in keys}
    if mean:
        out["mean"] = torch.empty(n, c, dtype=torch.float32, device=alpha.device)
    step = readout_chunk_rows(c, 8, chunk_rows)
    lab = None if labels is None else labels.to(device=alpha.device, dtype=torch.int64)
    for k in range(0, n, step):
        _readout_chunk_into(alpha[k:k + step], None if lab is None else lab[k:k + step],
                            {name: dst[k:k + step] for name, dst in out.items()})
    return out


def _readout_chunk_into(rows: torch.Tensor, lab: torch.Tensor | None, dst: dict) -> None:
    """The read-outs of one chunk, written into ``dst``'s float32 slices, with two float64
    buffers: ``a`` (the rows, turned in place into the mean t) and ``scratch``."""
    a = rows.to(torch.float64, copy=True)  # a copy: it is overwritten, even for a float64 bank
    a0 = a.sum(1)
    dst["alpha0"].copy_(a0)
    if lab is not None:
        dst["label_error"].copy_(1.0 - a.gather(1, lab[:, None])[:, 0] / a0)
    scratch = torch.add(a, 1.0)
    # E[H] = -sum_j t_j (psi(a_j + 1) - psi(a0 + 1)) = psi(a0 + 1) - sum_j a_j psi(a_j + 1) / a0
    expected = torch.digamma(a0 + 1) - scratch.digamma_().mul_(a).sum(1) / a0
    t = a.div_(a0[:, None])
    entropy = -torch.clamp(t, min=torch.finfo(torch.float64).tiny, out=scratch).log_().mul_(t).sum(1)
    dst["entropy"].copy_(entropy)
    dst["expected_entropy"].copy_(expected)
    dst["mutual_information"].copy_(entropy - expected)
    if "mean" in dst:
        dst["mean"].copy_(t)

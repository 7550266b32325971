"""Supervised contrastive loss / NT-Xent (docs/method.md §4): reference, checks, fake
kernel, opcheck samples and the public function. The kernels: csrc/cpu/supcon.cpp,
dps_fast/kernels/supcon.py, csrc/cuda/supcon.cu."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _dispatch
from .. import _validate as checks
from ._common import attach_grad, backend_for_autodiff, compute_dtype, needs_grad

OP = "supcon_fwd"
__all__ = ["supcon_loss"]


def rows(features, labels=None, soft_targets=None):
    """Flatten features to [M, d] rows (m = v * B + b) and the per-row positives
    source: integer labels [M] (hard / views mode) or soft targets [M, K]."""
    if features.dim() == 3:
        v, b, d = features.shape
        f = features.reshape(v * b, d)
    else:
        v, b = 0, features.shape[0]
        f = features
    m = f.shape[0]

    def per_row(x):
        return x if x.shape[0] == m else x.repeat((m // x.shape[0],) + (1,) * (x.dim() - 1))

    if soft_targets is not None:
        return f, None, per_row(soft_targets)
    if labels is None:  # NT-Xent: the other views of the same sample are the positives
        labels = torch.arange(b, device=features.device)
    return f, per_row(labels.to(torch.int64)), None


def _positive_weights(lab, soft, eye, cdt):
    if soft is not None:
        sd = soft.to(cdt)
        w = sd @ sd.t()
    else:
        w = (lab[:, None] == lab[None, :]).to(cdt)
    return w.masked_fill(eye, 0.0)


def reference(features, labels=None, tau=0.1, normalize=True, soft_targets=None):
    f, lab, soft = rows(features, labels, soft_targets)
    cdt = compute_dtype(features)
    m = f.shape[0]
    f = f.to(cdt)
    if m < 2:
        return f.sum() * 0.0
    if normalize:
        f = F.normalize(f, dim=1)
    s = f @ f.t() / tau
    eye = torch.eye(m, dtype=torch.bool, device=f.device)
    lse = torch.logsumexp(s.masked_fill(eye, float("-inf")), dim=1)
    with torch.no_grad():
        w = _positive_weights(lab, soft, eye, cdt)
        wsum = w.sum(1)
        valid = wsum > 0
    pos = (w * s.masked_fill(eye, 0.0)).sum(1) / wsum.clamp_min(torch.finfo(cdt).tiny)
    per_anchor = torch.where(valid, lse - pos, torch.zeros_like(lse))
    return per_anchor.sum() / valid.sum().clamp_min(1).to(cdt)


def check(features, labels, tau, soft_targets):
    """Returns (M, d, V, B) with V = 0 for flat [M, d] features."""
    checks.floating("features", features)
    if features.dim() == 3:
        v, b, d = features.shape
        m = v * b
    elif features.dim() == 2:
        m, d = features.shape
        v, b = 0, m
    else:
        raise ValueError(f"features must have shape [V, B, d] or [M, d], got {list(features.shape)}")
    if d < 1:
        raise ValueError("features must have at least one dimension (d >= 1)")
    checks.positive("tau", tau)
    _check_positives(labels, soft_targets, v, b, m)
    checks.same_device(features=features, labels=labels, soft_targets=soft_targets)
    return m, d, v, b


def _check_positives(labels, soft_targets, v, b, m):
    if labels is not None and soft_targets is not None:
        raise ValueError("give labels or soft_targets, not both")
    if labels is not None:
        checks.tensor("labels", labels)
        if labels.dtype not in checks.INT_DTYPES:
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] not in (b, m):
            raise ValueError(f"labels must have shape [{b}] (one per sample) or [{m}] (one per row), "
                             f"got {list(labels.shape)}")
    elif soft_targets is not None:
        checks.floating("soft_targets", soft_targets)
        if soft_targets.dim() != 2 or soft_targets.shape[0] not in (b, m):
            raise ValueError(f"soft_targets must have shape [{b}, K] or [{m}, K], got {list(soft_targets.shape)}")
    elif v == 0:
        raise ValueError("supcon_loss without labels pairs the views of each sample: pass features of "
                         "shape [V, B, d] (V >= 2), or give labels")


def fake(features, labels, soft, tau, normalize, need_grad):
    grad = torch.empty_like(features) if need_grad else features.new_empty((0,))
    return features.new_empty((), dtype=torch.float32), grad


def opcheck_samples(device):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(8, 4, generator=g).to(device)
    lab = torch.tensor([0, 1, 0, 2, 1, 0, 3, 3], device=device)
    return [(f, lab, None, 0.2, True, True), (f, None, torch.rand(8, 3, generator=g).to(device), 0.2, False, False)]


def supcon_loss(features, labels=None, tau=0.1, normalize=True, soft_targets=None, backend=None):
    """Supervised contrastive loss (docs/method.md §4), mean over anchors with a positive.

    features: [V, B, d] (V views of B samples) or [M, d]. Positives: rows with the
    same label (``labels`` [B] or [M]); with ``soft_targets`` [B, K] or [M, K] the
    weight <T_i, T_j>; with neither, the other views of the same sample (NT-Xent).
    The fused backends never hold the M x M similarity matrix.
    """
    m, d, v, b = check(features, labels, tau, soft_targets)
    tau = float(tau)
    dtypes = (features.dtype,) + ((soft_targets.dtype,) if soft_targets is not None else ())
    name = _dispatch.resolve(backend, features.device, dtypes)
    name = backend_for_autodiff(features, name, backend, "supcon_loss")
    if name == "reference" or m < 2:
        return reference(features, labels, tau, normalize, soft_targets)
    f, lab, soft = rows(features, labels, soft_targets)
    need = needs_grad(features)
    loss, grad = _dispatch.op(name, OP)(
        f.detach(), lab, None if soft is None else soft.detach(), tau, bool(normalize), need
    )
    return attach_grad(loss, features, grad.view(features.shape)) if need else loss

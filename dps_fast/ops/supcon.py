"""Supervised contrastive loss / NT-Xent (docs/method.md §4): reference, checks, the host glue
of every fused backend, fake kernels, opcheck samples and the public function.

Each fused backend provides the two O(M^2) parts as kernel ops over float32 rows f [M, d]:
``supcon_lse`` (each row's logsumexp over j != i) and ``supcon_grad`` (the softmax part of
d loss / d f). :func:`fused` is the glue around them, written once: normalisation, the
positive term in closed form (:func:`positive_terms`: it is linear in the features, so it
costs O(M d) or O(M d K), not a pass over the M^2 pairs), the mean over anchors, and the
normalisation's backward. The kernels: csrc/cpu/supcon.cpp, dps_fast/kernels/supcon.py,
csrc/cuda/supcon.cu (glue csrc/cuda/supcon_glue.cpp, launches only)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _dispatch
from .. import _validate
from ._common import BadInput, Kernel, attach_grad, backend_for_autodiff, compute_dtype, needs_grad

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
    _validate.floating("features", features)
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
    _validate.positive("tau", tau)
    _check_positives(labels, soft_targets, v, b, m)
    _validate.same_device(features=features, labels=labels, soft_targets=soft_targets)
    return m, d, v, b


def _check_positives(labels, soft_targets, v, b, m):
    if labels is not None and soft_targets is not None:
        raise ValueError("give labels or soft_targets, not both")
    if labels is not None:
        _validate.tensor("labels", labels)
        if labels.dtype not in _validate.INT_DTYPES:
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] not in (b, m):
            raise ValueError(f"labels must have shape [{b}] (one per sample) or [{m}] (one per row), "
                             f"got {list(labels.shape)}")
    elif soft_targets is not None:
        _validate.floating("soft_targets", soft_targets)
        if soft_targets.dim() != 2 or soft_targets.shape[0] not in (b, m):
            raise ValueError(f"soft_targets must have shape [{b}, K] or [{m}, K], got {list(soft_targets.shape)}")
    elif v == 0:
        raise ValueError("supcon_loss without labels pairs the views of each sample: pass features of "
                         "shape [V, B, d] (V >= 2), or give labels")


def _groups(labels):
    """Each row's group id in [0, M): the sorted position of the first row with its label. Sizes
    do not depend on the data, so nothing waits for the device (torch.unique would)."""
    ordered, perm = labels.sort()
    first = torch.searchsorted(ordered, ordered)
    return torch.empty_like(perm).scatter_(0, perm, first)


def positive_terms(f, labels, soft):
    """The positive term of every anchor in closed form, in float64 (docs/method.md §4):
    ``(wsum, wdot, pull)`` with ``wsum_i = sum_{j != i} w_ij``, ``wdot_i = sum_{j != i} w_ij
    <f_i, f_j>``, w_ij = [l_i = l_j] (hard ``labels``) or <t_i, t_j> (``soft``), and ``pull(u)``
    = ``sum_{j != i} w_ij (u_i + u_j) f_j`` [M, d], the term's gradient for coefficients u [M].
    Hard labels: per-class sums of f (and of u f); soft: F^T T (and (u F)^T T)."""
    f = f.double()
    if soft is None:
        cls = _groups(labels)
        f1 = torch.cat([f, torch.ones_like(f[:, :1])], 1)  # f and a count column
        sums = torch.zeros_like(f1).index_add_(0, cls, f1)  # per class: the sum of f, and the count
        others = sums[cls] - f1  # over j != i of the same class
        wsum, others = others[:, -1], others[:, :-1]

        def pull(u):
            uf = u[:, None] * f
            return u[:, None] * others + torch.zeros_like(f).index_add_(0, cls, uf)[cls] - uf
        return wsum, (f * others).sum(1), pull
    t = soft.double()
    tt = (t * t).sum(1)
    ft = f.t() @ t  # [d, K]

    def pull_soft(u):
        return u[:, None] * (t @ ft.t()) + t @ ((u[:, None] * f).t() @ t).t() - 2 * (u * tt)[:, None] * f
    wsum = (t * t.sum(0)).sum(1) - tt  # the same reduction order as tt: exactly 0 for no overlap
    return wsum, ((f @ ft) * t).sum(1) - tt * (f * f).sum(1), pull_soft


def fused(lse_op, grad_op, features, labels, soft, tau, normalize, need_grad):
    """The loss (float32 scalar) and, if ``need_grad``, d loss / d features (in their dtype, else
    None) by a backend's kernel ops ``lse_op`` and ``grad_op``: the host glue of every fused
    backend. ``features`` [M, d] with M >= 2; ``labels`` int64 [M] or ``soft`` [M, K] (one of them)."""
    x = features.float().contiguous()
    norm = x.norm(dim=1, keepdim=True).clamp_min(1e-12) if normalize else None  # as F.normalize
    f = (x / norm).contiguous() if normalize else x
    inv_tau = 1.0 / tau
    lse = lse_op(f, inv_tau)
    wsum, wdot, pull = positive_terms(f, labels, soft)
    valid = wsum > 0
    n_valid = valid.sum().clamp_min(1)
    safe = torch.where(valid, wsum, 1.0)
    loss = (torch.where(valid, lse.double() - wdot * inv_tau / safe, 0.0).sum() / n_valid).float()
    if not need_grad:
        return loss, None
    coef = valid.double() / n_valid
    df = (grad_op(f, lse, coef.float(), inv_tau).double() - inv_tau * pull(coef / safe)).float()
    if normalize:  # f = x / |x|: dx = (df - f <f, df>) / |x|
        df = (df - f * (f * df).sum(1, keepdim=True)) / norm
    return loss, df.to(features.dtype)


def fake_lse(f, inv_tau):
    return f.new_empty(f.shape[:1], dtype=torch.float32)


def fake_grad(f, lse, coef, inv_tau):
    return torch.empty_like(f)


def _sample_rows(device):
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=1).to(device), g


def lse_samples(device):
    f, _ = _sample_rows(device)
    return [(f, 5.0), (f[:2], 0.5)]


def grad_samples(device):
    f, g = _sample_rows(device)
    lse, coef = (torch.rand(8, generator=g).to(device) for _ in range(2))
    return [(f, lse, coef, 5.0)]


KERNELS = (Kernel("supcon_lse", fake_lse, lse_samples), Kernel("supcon_grad", fake_grad, grad_samples))


def sample_call(device="cpu"):
    """Keyword arguments of a small valid call of :func:`supcon_loss` (NT-Xent over 2 views)."""
    return dict(features=torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0)).to(device))


def bad_inputs():
    """Calls :func:`check` refuses, with the error every backend raises."""
    return [
        BadInput("tau zero", dict(tau=0.0), ValueError, "tau must be positive"),
        BadInput("labels shape", dict(labels=torch.arange(5)), ValueError, "labels must have shape"),
        BadInput("float labels", dict(labels=torch.rand(4)), TypeError, "labels must be an integer"),
        BadInput("labels and soft targets", dict(labels=torch.arange(4), soft_targets=torch.rand(4, 2)), ValueError,
                 "not both"),
        BadInput("one view, no labels", dict(features=torch.randn(4, 3)), ValueError, "pairs the views"),
    ]


def bytes_moved(m, d, f_bytes=4, label_bytes=8):
    """Byte model (fwd+bwd), the least any implementation must move: features read and their
    gradient written (M*d each), the labels read."""
    return m * d * 2 * f_bytes + m * label_bytes


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
    loss, grad = fused(_dispatch.op(name, "supcon_lse"), _dispatch.op(name, "supcon_grad"), f.detach(), lab,
                       None if soft is None else soft.detach(), tau, bool(normalize), need)
    return attach_grad(loss, features, grad.view(features.shape)) if need else loss

"""Reference implementation of SPEC.md, in plain PyTorch.

This module is the oracle every fused backend is tested against, and the
fallback for devices and dtypes the fused kernels do not cover. It computes in
float32 (float64 when an input is float64) whatever the storage dtype, and it
follows SPEC.md literally. It does not validate its inputs: the public API in
:mod:`dps_fast.functional` does that once, for every backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()
    if reduction == "sum":
        return loss.sum()
    return loss


# --------------------------------------------------------------------------- SPEC §1
def init_prior(labels, num_classes: int, c: float = 100.0, eps: float = 1e-2,
               dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Prior bank alpha [N, C]: c on the label, eps elsewhere.

    ``labels`` is an integer tensor [N], or a soft label matrix [N, C] (its
    argmax is used).
    """
    from . import _validate as V

    V.positive("c", c)
    V.positive("eps", eps)
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
    device = labels.device if device is None else torch.device(device)
    alpha = torch.full((labels.shape[0], num_classes), float(eps), dtype=dtype, device=device)
    alpha.scatter_(1, labels.to(device)[:, None], float(c))
    return alpha


# --------------------------------------------------------------------------- SPEC §2
def dps_cross_entropy(logits, index, alpha, gamma=0.95, tau_e=1.0, target="posterior",
                      reduction="mean", update=True):
    """One DPS step. Mutates ``alpha`` rows ``index`` when ``update``.

    Policy for non-finite logits (documented in docs/method.md): a sample with
    any NaN/Inf logit, in any view, leaves its bank row untouched, and its loss
    and gradient are NaN.
    """
    cdt = _compute_dtype(logits, alpha)
    z = logits.to(cdt)
    z3 = z if z.dim() == 3 else z.unsqueeze(0)
    with torch.no_grad():
        zd = z3.detach()
        bad = ~torch.isfinite(zd).all(-1).all(0)                       # [B]
        e = torch.softmax(zd / tau_e, dim=-1).mean(0)                  # [B, C]
        a_old = alpha[index].to(cdt)
        a_new = torch.where(bad[:, None], a_old, gamma * a_old + e)
        if update:
            alpha[index] = a_new.to(alpha.dtype)
        a = a_new if target == "posterior" else a_old
        t = a / a.sum(-1, keepdim=True)
        nan_pad = torch.where(bad, float("nan"), 0.0).to(cdt)[None, :, None]
    zz = z3 + nan_pad
    loss = torch.logsumexp(zz, dim=-1) - (t.unsqueeze(0) * zz).sum(-1)  # [V, B]
    if logits.dim() == 2:
        loss = loss[0]
    return _reduce(loss, reduction)


# --------------------------------------------------------------------------- SPEC §3
def soft_cross_entropy(logits, target, reduction="mean", normalize=False):
    cdt = _compute_dtype(logits, target)
    z = logits.to(cdt)
    t = target.detach().to(cdt)
    if normalize:
        t = t / t.sum(-1, keepdim=True)
    loss = torch.logsumexp(z, dim=-1) - (t * z).sum(-1)
    return _reduce(loss, reduction)


# --------------------------------------------------------------------------- SPEC §4
def supcon_rows(features, labels=None, soft_targets=None):
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


def supcon_loss(features, labels=None, tau=0.1, normalize=True, soft_targets=None):
    f, lab, soft = supcon_rows(features, labels, soft_targets)
    cdt = _compute_dtype(features)
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
        if soft is not None:
            sd = soft.to(cdt)
            w = sd @ sd.t()
        else:
            w = (lab[:, None] == lab[None, :]).to(cdt)
        w = w.masked_fill(eye, 0.0)
        wsum = w.sum(1)
        valid = wsum > 0
    pos = (w * s.masked_fill(eye, 0.0)).sum(1) / wsum.clamp_min(torch.finfo(cdt).tiny)
    per_anchor = torch.where(valid, lse - pos, torch.zeros_like(lse))
    return per_anchor.sum() / valid.sum().clamp_min(1).to(cdt)


# --------------------------------------------------------------------------- SPEC §5
@torch.no_grad()
def posterior_readouts(alpha: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """Read-outs of Dirichlet rows alpha [N, C] (computed in float64)."""
    a = alpha.to(torch.float64)
    a0 = a.sum(-1)
    t = a / a0[:, None]
    logt = torch.log(t.clamp_min(torch.finfo(torch.float64).tiny))
    entropy = -(t * logt).sum(-1)
    expected_entropy = -(t * (torch.digamma(a + 1) - torch.digamma(a0 + 1)[:, None])).sum(-1)
    out = {
        "mean": t.to(torch.float32),
        "alpha0": a0.to(torch.float32),
        "entropy": entropy.to(torch.float32),
        "expected_entropy": expected_entropy.to(torch.float32),
        "mutual_information": (entropy - expected_entropy).to(torch.float32),
    }
    if labels is not None:
        lab = labels.to(device=a.device, dtype=torch.int64)
        out["label_error"] = (1.0 - t.gather(1, lab[:, None])[:, 0]).to(torch.float32)
    return out

"""Soft-target cross-entropy (docs/method.md §3): reference, checks, fake kernel, opcheck
samples and the public function. The kernels share the DPS step's files
(csrc/cpu/dps_cross_entropy.cpp, dps_fast/kernels/dps_cross_entropy.py, csrc/cuda/dps_cross_entropy.cu)."""
from __future__ import annotations

import torch

from .. import _dispatch
from .. import _validate
from ._common import (BadInput, Kernel, attach_grad, backend_for_autodiff, compute_dtype, empty_loss, grad_buffer,
                      loss_shape, needs_grad, reduce, soft_target_loss)

OP = "soft_ce_fwd"
__all__ = ["soft_cross_entropy"]


def reference(logits, target, reduction="mean", normalize=False):
    """``l_b = s_b * logsumexp(z_b) - <t_b, z_b>`` with ``s_b = sum_j t_bj`` (1 when
    ``normalize``): PyTorch's cross-entropy for any non-negative target rows (docs/method.md §3).
    A row with a NaN or +-Inf logit gets a NaN loss and gradient (docs/method.md §9)."""
    cdt = compute_dtype(logits, target)
    z = logits.to(cdt)
    with torch.no_grad():
        nan_pad = torch.where(torch.isfinite(z).all(-1), 0.0, float("nan")).to(cdt)
    z = z + nan_pad[..., None]
    t = target.detach().to(cdt)
    if normalize:
        t = t / t.sum(-1, keepdim=True)
    loss = soft_target_loss(z, t) + nan_pad  # a NaN row stays NaN where its t is all 0
    return reduce(loss, reduction)


def check(logits, target, reduction):
    _, b, c = _validate.logits_tensor(logits, allow_views=False)
    _validate.floating("target", target)
    if target.shape != logits.shape:
        raise ValueError(f"target must have the logits' shape {list(logits.shape)}, got {list(target.shape)}")
    _validate.same_device(logits=logits, target=target)
    return b, c, _validate.reduction_code(reduction)


def fake(logits, target, grad, normalize, reduction):
    return logits.new_empty(loss_shape(logits, reduction), dtype=torch.float32)


def opcheck_samples(device):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 7, generator=g).to(device)
    t = torch.softmax(torch.randn(5, 7, generator=g), -1).to(device)
    return [(z, t, torch.empty_like(z), False, red) for red in (0, 1, 2)] + [(z, t, z.new_empty((0,)), True, 1)]



KERNELS = (Kernel(OP, fake, opcheck_samples),)


def sample_call(device="cpu"):
    """Keyword arguments of a small valid call of :func:`soft_cross_entropy`."""
    g = torch.Generator().manual_seed(0)
    return dict(logits=torch.randn(4, 5, generator=g).to(device), target=torch.rand(4, 5, generator=g).to(device))


def bad_inputs():
    """Calls :func:`check` refuses, with the error every backend raises."""
    return [
        BadInput("target shape", dict(target=torch.rand(4, 6)), ValueError, "target must have the logits' shape"),
        BadInput("integer target", dict(target=torch.ones(4, 5, dtype=torch.long)), TypeError,
                 "target must be a floating"),
        BadInput("reduction", dict(reduction="x"), ValueError, "reduction must be one of"),
        BadInput("logits with views", dict(logits=torch.randn(2, 4, 5), target=torch.rand(2, 4, 5)), ValueError,
                 "logits must have shape"),
    ]


def bytes_moved(b, c, z_bytes=4, t_bytes=4):
    """Byte model (fwd+bwd): logits read, target read, gradient written."""
    return b * c * (2 * z_bytes + t_bytes)

def soft_cross_entropy(logits, target, reduction="mean", normalize=False, backend=None, inplace_grad=False):
    """Cross-entropy against soft targets (docs/method.md §3), fused forward and backward.

    ``l_b = s_b * logsumexp(z_b) - sum_j t_bj z_bj`` with ``s_b = sum_j t_bj``, which is
    ``F.cross_entropy(z, t)`` for any non-negative ``t``, rows that do not sum to 1 included;
    with ``normalize`` the targets are first divided by their row sum (then ``s_b = 1``).
    The gradient is ``s_b * softmax(z_b) - t_b``. The target is treated as a constant (no
    gradient flows into it).
    """
    b, c, red = check(logits, target, reduction)
    if inplace_grad:
        _validate.disjoint_from_logits("target", target, logits)
    name = _dispatch.resolve(backend, logits.device, (logits.dtype, target.dtype))
    if b == 0:
        return empty_loss(logits, red)
    name = backend_for_autodiff(logits, name, backend, "soft_cross_entropy")
    if name == "reference":
        return reference(logits, target, reduction, normalize)
    need = needs_grad(logits)
    z = logits.detach()
    grad = grad_buffer(z, need, inplace_grad)
    loss = _dispatch.op(name, OP)(z, target.detach(), grad, bool(normalize), red)
    if need and inplace_grad:
        torch.autograd.graph.increment_version(logits)  # its storage now holds the gradient
    return attach_grad(loss, logits, grad) if need else loss

"""The fused DPS step (docs/method.md §2): reference, checks, fake kernel, opcheck samples
and the public function, in one place. The kernels: csrc/cpu/dps_cross_entropy.cpp,
dps_fast/kernels/dps_cross_entropy.py, csrc/cuda/dps_cross_entropy.cu."""
from __future__ import annotations

import torch

from .. import _dispatch, _fast_path
from .. import _validate
from ._common import (BadInput, Kernel, attach_grad, backend_for_autodiff, compute_dtype, empty_loss, grad_buffer,
                      in_backward_recompute, loss_shape, needs_grad, reduce, soft_target_loss, under_functorch)

OP = "dps_ce_fwd"  # the whole call on plain CPU tensors: dps_fast._fast_path
__all__ = ["dps_cross_entropy"]


def reference(logits, index, alpha, gamma=0.95, tau_e=1.0, target="posterior", reduction="mean", update=True):
    """One DPS step in plain PyTorch. Mutates ``alpha`` rows ``index`` when ``update``.
    A sample with any NaN/Inf logit, in any view, or with an id outside [0, N) (only
    reachable unvalidated), leaves the bank untouched; its loss and gradient are NaN."""
    cdt = compute_dtype(logits, alpha)
    z = logits.to(cdt)
    z3 = z if z.dim() == 3 else z.unsqueeze(0)
    with torch.no_grad():
        zd = z3.detach()
        idx = index.to(torch.int64)
        inside = (idx >= 0) & (idx < alpha.shape[0])
        safe = torch.where(inside, idx, torch.zeros_like(idx))
        bad = ~torch.isfinite(zd).all(-1).all(0) | ~inside              # [B]
        # shifted before the temperature: (z - max) / tau_e cannot overflow for finite z
        shifted = zd - torch.where(bad[None, :, None], 0.0, zd.amax(-1, keepdim=True))
        e = torch.softmax(shifted / tau_e, dim=-1).mean(0)             # [B, C]
        a_old = alpha[safe].to(cdt)
        a_new = torch.where(bad[:, None], a_old, gamma * a_old + e)
        if update:
            alpha[safe[~bad]] = a_new[~bad].to(alpha.dtype)
        a = a_new if target == "posterior" else a_old
        t = a / a.sum(-1, keepdim=True)
        nan_pad = torch.where(bad, float("nan"), 0.0).to(cdt)[None, :, None]
    zz = z3 + nan_pad
    loss = soft_target_loss(zz, t.unsqueeze(0))  # [V, B]
    if logits.dim() == 2:
        loss = loss[0]
    return reduce(loss, reduction)


def check(logits, index, alpha, gamma, tau_e, target, reduction, validate=True):
    """Returns (V, B, C, gamma, tau_e, posterior: bool, reduction code, int64 index)."""
    v, b, c = _validate.logits_tensor(logits)
    _validate.index_tensor(index, b)
    _validate.bank(alpha, c)
    _validate.same_device(logits=logits, index=index, alpha=alpha)
    gamma = _validate.gamma_value(gamma)
    tau_e = _validate.evidence_temperature(tau_e)
    _validate.target_name(target)
    red = _validate.reduction_code(reduction)
    _validate.bank_storage(alpha, logits, index)
    index = _validate.checked_index(index, alpha.shape[0]) if validate and b else _validate.canonical_index(index)
    return v, b, c, gamma, tau_e, target == "posterior", red, index


def fake(logits, index, alpha, grad, gamma, tau_e, posterior, update, reduction):
    return logits.new_empty(loss_shape(logits, reduction), dtype=torch.float32)


def opcheck_samples(device):
    """Arguments for torch.library.opcheck of the op on ``device``."""
    def args(dtype=torch.float32, bank_dtype=torch.float32, v=2, need_grad=True, red=1):
        g = torch.Generator().manual_seed(0)
        z = torch.randn(v, 6, 11, generator=g).to(device, dtype)
        idx = torch.tensor([4, 0, 9, 2, 7, 5], device=device)
        alpha = (torch.rand(12, 11, generator=g) + 0.1).to(device, bank_dtype)
        grad = torch.empty_like(z) if need_grad else z.new_empty((0,))
        return (z, idx, alpha, grad, 0.9, 1.0, True, True, red)
    return [args(red=r) for r in (0, 1, 2)] + [args(torch.bfloat16, torch.bfloat16, v=1), args(need_grad=False)]



KERNELS = (Kernel(OP, fake, opcheck_samples),)


def sample_call(device="cpu"):
    """Keyword arguments of a small valid call of :func:`dps_cross_entropy` (the base of
    :func:`bad_inputs`)."""
    g = torch.Generator().manual_seed(0)
    alpha = (torch.rand(20, 5, generator=g) + 0.1).to(device)
    return dict(logits=torch.randn(4, 5, generator=g).to(device), index=torch.tensor([0, 3, 7, 19], device=device),
                alpha=alpha)


def bad_inputs():
    """Calls :func:`check` refuses, with the error every backend raises before any write."""
    t = torch.tensor
    return [
        BadInput("index out of range", dict(index=t([0, 3, 7, 20])), IndexError, "index 20 is out of range"),
        BadInput("negative index", dict(index=t([0, -1, 7, 2])), IndexError, "index -1 is out of range"),
        BadInput("duplicate index", dict(index=t([0, 3, 3, 2])), ValueError, "duplicate id 3"),
        BadInput("float index", dict(index=t([0.0, 1.0, 2.0, 3.0])), TypeError, "index must be an integer"),
        BadInput("index shape", dict(index=t([0, 1, 2])), ValueError, r"index must have shape \[4\]"),
        BadInput("integer logits", dict(logits=torch.ones(4, 5, dtype=torch.int64)), TypeError, "floating-point"),
        BadInput("logits rank", dict(logits=torch.randn(5)), ValueError, "logits must have shape"),
        BadInput("class mismatch", dict(logits=torch.randn(4, 6)), ValueError,
                 "alpha has 5 classes but the logits have 6"),
        BadInput("alpha rank", dict(alpha=torch.ones(20 * 5)), ValueError, r"alpha must have shape \[N, C\]"),
        BadInput("integer alpha", dict(alpha=torch.ones(20, 5, dtype=torch.int32)), TypeError,
                 "alpha must be a floating"),
        BadInput("gamma zero", dict(gamma=0.0), ValueError, r"gamma must lie in \(0, 1\]"),
        BadInput("gamma above one", dict(gamma=1.5), ValueError, r"gamma must lie in \(0, 1\]"),
        BadInput("tau_e zero", dict(tau_e=0.0), ValueError, "tau_e must be positive"),
        BadInput("tau_e inf", dict(tau_e=float("inf")), ValueError, "tau_e must be positive"),
        BadInput("target", dict(target="mode"), ValueError, "target must be one of"),
        BadInput("reduction", dict(reduction="avg"), ValueError, "reduction must be one of"),
        BadInput("not a tensor", dict(logits=[[1.0] * 5] * 4), TypeError, "logits must be a torch.Tensor"),
    ]


def bytes_moved(b, c, v=1, z_bytes=4, a_bytes=4, idx_bytes=8):
    """Byte model of one DPS step (fwd+bwd), the least any implementation must move: logits
    read and gradient written (V*B*C each, z_bytes per element), bank rows read and written
    (B*C each, a_bytes per element), plus the index. (A gradient written with ordinary
    stores also reads each of its lines first.)"""
    return v * b * c * 2 * z_bytes + b * c * 2 * a_bytes + b * idx_bytes

def dps_cross_entropy(logits, index, alpha, gamma=0.95, tau_e=1.0, target="posterior",
                      reduction="mean", update=True, backend=None, validate=True,
                      inplace_grad=False):
    """One DPS step (docs/method.md §2): update the bank rows ``index`` with the model's
    evidence and return the cross-entropy against the posterior-mean targets.

    Args:
        logits: [B, C] or [V, B, C] (V augmented views of the same B samples).
        index: integer tensor [B] of distinct sample ids in [0, N).
        alpha: the bank [N, C] (float32/bfloat16/float16); mutated in place when ``update``.
        gamma: discount in (0, 1]. tau_e: evidence temperature (> 0).
        target: "posterior" (after the update, default) or "prior" (before it).
        reduction: "mean" over all V*B terms, "sum" or "none" ([B] or [V, B]).
        update: apply the bank update (training); False only reads.
        backend: None/"auto", "reference", "cpu", "triton" or "cuda".
        validate: check index range and duplicates on the host (set False for CUDA
            graph capture; every backend then skips out-of-range rows, docs/method.md §9).
        inplace_grad: write the gradient into ``logits``' storage instead of a new
            buffer (saves memory; eager only; ``logits`` must not be needed afterwards).
    """
    loss = None if inplace_grad else _fast_path.step(logits, index, alpha, gamma, tau_e, target, reduction,
                                                     update, validate, backend)
    if loss is not None:
        return loss
    v, b, c, gamma, tau_e, posterior, red, index = check(logits, index, alpha, gamma, tau_e, target, reduction,
                                                         validate)
    if inplace_grad:
        _validate.disjoint_from_logits("index", index, logits)
    name = _dispatch.resolve(backend, logits.device, (logits.dtype, alpha.dtype))
    return run(logits, index, alpha, gamma, tau_e, posterior, reduction, update, name, backend, inplace_grad)


def run(logits, index, alpha, gamma, tau_e, posterior, reduction, update, name, backend=None, inplace_grad=False,
        grad_cache=None):
    """The step on checked arguments (``index`` int64; ``name`` the resolved backend): the
    banks call this after their own checks (dps_fast/banks/base.py), with their GradCache."""
    red = _validate.REDUCTIONS[reduction]
    if logits.shape[-2] == 0:
        return empty_loss(logits, red)
    if update and under_functorch(logits):
        raise RuntimeError("dps_fast: dps_cross_entropy(update=True) writes the bank, which torch.func "
                           "transforms (grad, vmap, ...) forbid; call it outside the transform, or with "
                           "update=False")
    name = backend_for_autodiff(logits, name, backend, "dps_cross_entropy")
    if update and in_backward_recompute():
        # Activation checkpointing re-runs this forward inside backward: the bank
        # already holds this call's posterior, so read it instead of updating twice.
        if not posterior:
            raise RuntimeError(
                "dps_cross_entropy(target='prior') cannot be recomputed by activation "
                "checkpointing (the prior is gone once the bank is updated); call the loss "
                "outside the checkpointed region"
            )
        update, posterior = False, False
    if name == "reference":
        return reference(logits, index, alpha, gamma, tau_e, "posterior" if posterior else "prior", reduction,
                         update)
    need = needs_grad(logits)
    z = logits.detach()
    grad = grad_buffer(z, need, inplace_grad, grad_cache)
    loss = _dispatch.op(name, OP)(z, index, alpha, grad, gamma, tau_e, posterior, update, red)
    if need and inplace_grad:
        torch.autograd.graph.increment_version(logits)  # its storage now holds the gradient
    return attach_grad(loss, logits, grad) if need else loss

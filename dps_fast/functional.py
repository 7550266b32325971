"""Public functional API: validate -> dispatch -> backend.

Losses are returned in float32 (float64 for float64 inputs); gradients flow back
in the logits' dtype.
"""
from __future__ import annotations

import torch

from . import _dispatch, _ops, reference
from . import _validate as V

__all__ = ["dps_cross_entropy", "soft_cross_entropy", "supcon_loss", "init_prior", "posterior_readouts"]

init_prior = reference.init_prior
posterior_readouts = reference.posterior_readouts


def _empty_loss(logits: torch.Tensor, red: int) -> torch.Tensor:
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    per_row = logits.to(cdt).sum(-1) * 0.0
    return per_row if red == _ops.REDUCTION_NONE else per_row.sum()


def _needs_grad(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def _in_backward_recompute() -> bool:
    """True while autograd re-runs a forward (activation checkpointing)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _grad_buffer(x: torch.Tensor, need: bool, inplace: bool) -> torch.Tensor:
    if not need:
        return x.new_empty((0,))
    if inplace:
        if torch.compiler.is_compiling():
            raise ValueError("inplace_grad=True is an eager-mode option; it cannot be compiled")
        if not x.is_contiguous():
            raise ValueError("inplace_grad=True needs contiguous logits")
        return x.detach()
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def dps_cross_entropy(logits, index, alpha, gamma=0.95, tau_e=1.0, target="posterior",
                      reduction="mean", update=True, backend=None, validate=True,
                      inplace_grad=False):
    """One DPS step (SPEC §2): update the bank rows ``index`` with the model's
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
            graph capture; kernels then skip out-of-range rows instead of raising).
        inplace_grad: write the gradient into ``logits``' storage instead of a new
            buffer (saves memory; eager only; ``logits`` must not be needed afterwards).

    Empty batch (B == 0): zero loss, the bank is not touched. Non-finite logits: the
    sample's bank row is left untouched and its loss and gradient are NaN.
    """
    v, b, c, gamma, tau_e, posterior, red = V.check_dps(
        logits, index, alpha, gamma, tau_e, target, reduction, validate
    )
    if b == 0:
        return _empty_loss(logits, red)
    if update and _in_backward_recompute():
        # Activation checkpointing re-runs this forward inside backward: the bank
        # already holds this call's posterior, so read it instead of updating twice.
        if not posterior:
            raise RuntimeError(
                "dps_cross_entropy(target='prior') cannot be recomputed by activation "
                "checkpointing (the prior is gone once the bank is updated); call the loss "
                "outside the checkpointed region"
            )
        update, posterior = False, False
    name = _dispatch.resolve(backend, logits.device, (logits.dtype, alpha.dtype))
    if name == "reference":
        return reference.dps_cross_entropy(
            logits, index, alpha, gamma, tau_e, "posterior" if posterior else "prior",
            reduction, update,
        )
    need = _needs_grad(logits)
    z = logits.detach()
    grad = _grad_buffer(z, need, inplace_grad)
    loss = _dispatch.ops(name).dps_ce_fwd(z, index, alpha, grad, gamma, tau_e, posterior, update, red)
    return _ops.attach_grad(loss, logits, grad) if need else loss


def soft_cross_entropy(logits, target, reduction="mean", normalize=False, backend=None,
                       inplace_grad=False):
    """Cross-entropy against soft targets (SPEC §3), fused forward and backward.

    ``l_b = logsumexp(z_b) - sum_j t_bj z_bj`` (targets divided by their row sum
    when ``normalize``). Equal to ``F.cross_entropy(z, t)`` when rows of t sum to 1.
    The target is treated as a constant (no gradient flows into it).
    """
    b, c, red = V.check_soft_ce(logits, target, reduction)
    if b == 0:
        return _empty_loss(logits, red)
    name = _dispatch.resolve(backend, logits.device, (logits.dtype, target.dtype))
    if name == "reference":
        return reference.soft_cross_entropy(logits, target, reduction, normalize)
    need = _needs_grad(logits)
    z = logits.detach()
    grad = _grad_buffer(z, need, inplace_grad)
    loss = _dispatch.ops(name).soft_ce_fwd(z, target.detach(), grad, bool(normalize), red)
    return _ops.attach_grad(loss, logits, grad) if need else loss


def supcon_loss(features, labels=None, tau=0.1, normalize=True, soft_targets=None, backend=None):
    """Supervised contrastive loss (SPEC §4), mean over anchors with a positive.

    features: [V, B, d] (V views of B samples) or [M, d]. Positives: rows with the
    same label (``labels`` [B] or [M]); with ``soft_targets`` [B, K] or [M, K] the
    weight <T_i, T_j>; with neither, the other views of the same sample (NT-Xent).
    The fused backends never hold the M x M similarity matrix.
    """
    m, d, v, b = V.check_supcon(features, labels, tau, soft_targets)
    tau = float(tau)
    dtypes = (features.dtype,) + ((soft_targets.dtype,) if soft_targets is not None else ())
    name = _dispatch.resolve(backend, features.device, dtypes)
    if name == "reference" or m < 2:
        return reference.supcon_loss(features, labels, tau, normalize, soft_targets)
    f, lab, soft = reference.supcon_rows(features, labels, soft_targets)
    need = _needs_grad(features)
    loss, grad = _dispatch.ops(name).supcon_fwd(
        f.detach(), lab, None if soft is None else soft.detach(), tau, bool(normalize), need
    )
    return _ops.attach_grad(loss, features, grad.view(features.shape)) if need else loss

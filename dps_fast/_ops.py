"""Op schemas, fake (meta) kernels and the autograd glue shared by the fused backends.

Every fused backend exposes three ops with the same schemas (``SCHEMAS``): the
C++ extension under ``torch.ops.dps_fast`` (CPU and CUDA dispatch keys) and the
Triton kernels under ``torch.ops.dps_fast_triton``.

Each forward op computes the loss *and* the gradient of the loss in one pass
(the gradient of a softmax cross-entropy is known in closed form). The DPS op
mutates the bank, so it cannot carry an autograd formula itself (``torch.library``
only differentiates functional ops). Instead the public API calls it on detached
inputs and then ``dps_fast::attach_grad(loss, x, grad)``: a functional op that
returns a copy of ``loss`` and whose backward is ``grad * grad_output``. The update
therefore happens once per forward, in the forward graph, also under
``torch.compile``; backward only scales.
"""
from __future__ import annotations

import torch

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2

SCHEMAS = {
    "dps_ce_fwd": (
        "dps_ce_fwd(Tensor logits, Tensor index, Tensor(a!) alpha, Tensor(b!) grad, float gamma, "
        "float tau_e, bool posterior, bool update, int reduction) -> Tensor"
    ),
    "soft_ce_fwd": (
        "soft_ce_fwd(Tensor logits, Tensor target, Tensor(a!) grad, bool normalize, int reduction) -> Tensor"
    ),
    "supcon_fwd": (
        "supcon_fwd(Tensor features, Tensor? labels, Tensor? soft, float tau, bool normalize, "
        "bool need_grad) -> (Tensor, Tensor)"
    ),
}


def _loss_shape(logits: torch.Tensor, reduction: int):
    return tuple(logits.shape[:-1]) if reduction == REDUCTION_NONE else ()


def fake_dps_ce_fwd(logits, index, alpha, grad, gamma, tau_e, posterior, update, reduction):
    return logits.new_empty(_loss_shape(logits, reduction), dtype=torch.float32)


def fake_soft_ce_fwd(logits, target, grad, normalize, reduction):
    return logits.new_empty(_loss_shape(logits, reduction), dtype=torch.float32)


def fake_supcon_fwd(features, labels, soft, tau, normalize, need_grad):
    grad = torch.empty_like(features) if need_grad else features.new_empty((0,))
    return features.new_empty((), dtype=torch.float32), grad


FAKES = {"dps_ce_fwd": fake_dps_ce_fwd, "soft_ce_fwd": fake_soft_ce_fwd, "supcon_fwd": fake_supcon_fwd}


def register_fakes(namespace: str) -> None:
    for name, fn in FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}", fn)


# --------------------------------------------------------------------------- attach_grad
_lib = torch.library.Library("dps_fast", "FRAGMENT")
_lib.define("attach_grad(Tensor loss, Tensor x, Tensor grad) -> Tensor")


def _attach_grad_impl(loss, x, grad):
    return loss.clone()


_lib.impl("attach_grad", _attach_grad_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("dps_fast::attach_grad")
def _attach_grad_fake(loss, x, grad):
    return torch.empty_like(loss)


def _attach_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def scale_grad(grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The backward of every fused loss: the forward's gradient times grad_output
    (a scalar, or one value per row for reduction="none"). On CPU, an upstream
    gradient of exactly 1 (``loss.backward()``) returns the buffer itself: autograd
    then moves it into ``.grad`` without a copy (it clones when the graph is kept)."""
    if g.dim():
        g = g.reshape(g.shape + (1,) * (grad.dim() - g.dim()))
        return (grad * g).to(grad.dtype)
    if type(g) is torch.Tensor and g.device.type == "cpu" and g.item() == 1.0:
        return grad
    return (grad * g).to(grad.dtype)


def _attach_grad_backward(ctx, grad_output):
    (grad,) = ctx.saved_tensors
    return None, scale_grad(grad, grad_output), None


torch.library.register_autograd(
    "dps_fast::attach_grad", _attach_grad_backward, setup_context=_attach_grad_setup
)


class _Attach(torch.autograd.Function):
    """Eager twin of ``dps_fast::attach_grad`` (a Python autograd.Function costs a
    fraction of a Python-implemented custom op's dispatch)."""

    @staticmethod
    def forward(ctx, loss, x, grad):
        ctx.grad = grad
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return None, scale_grad(ctx.grad, grad_output), None


def attach_grad(loss: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``loss``, with ``d loss / d x = grad`` for autograd."""
    if torch.compiler.is_compiling():
        return torch.ops.dps_fast.attach_grad(loss, x, grad)
    return _Attach.apply(loss, x, grad)

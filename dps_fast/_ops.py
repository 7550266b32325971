"""Op registration shared by the fused backends: schemas, fake kernels, autograd glue.

Every fused op is defined once, by the C++ extension (``torch.ops.dps_fast``, CPU and
CUDA dispatch keys; the schema sits next to the CPU kernel); the Triton kernels register
the same schemas under ``torch.ops.dps_fast_triton``. The ops themselves (reference,
checks, fake kernel, public function) live one per module in :mod:`dps_fast.ops`.

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

from .ops._common import REDUCTION_MEAN, REDUCTION_NONE, REDUCTION_SUM  # noqa: F401


def op_modules():
    from .ops import MODULES

    return MODULES


def schema(op: str) -> str:
    """The schema of ``op`` (without its namespace) as the C++ extension defines it: the one
    definition, next to the op's CPU kernel."""
    return str(getattr(torch.ops.dps_fast, op).default._schema).split("::", 1)[1]


def register_fakes(namespace: str) -> None:
    """The shape functions of every fused op (for torch.compile / FakeTensor)."""
    for mod in op_modules():
        torch.library.register_fake(f"{namespace}::{mod.OP}", mod.fake)


def register_check_index() -> None:
    """``dps_fast::check_index`` beyond its C++ CPU kernel: a fake (torch.compile) and the
    host-side check for CUDA tensors."""
    from . import _validate as checks

    def fake(index, n):
        return torch.empty(index.shape, dtype=torch.int64, device=index.device)

    def on_cuda(index, n):
        checks.index_values(index.cpu(), n)
        return index.to(torch.int64).clone()

    torch.library.register_fake("dps_fast::check_index", fake)
    torch.library.impl("dps_fast::check_index", "CUDA", on_cuda)


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


def no_double_backward() -> None:
    """The fused backward returns a precomputed gradient buffer: it has no derivative of its
    own. With create_graph=True (gradient penalties, Hessian-vector products) a second
    derivative through it would be silently wrong, so it is an error instead."""
    if torch.is_grad_enabled():
        raise RuntimeError("dps_fast: the fused backends have no second derivative (backward with "
                           "create_graph=True, a gradient penalty, torch.func.hessian...); use backend='reference' "
                           "for higher-order gradients")


def _attach_grad_backward(ctx, grad_output):
    no_double_backward()
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
        no_double_backward()
        return None, scale_grad(ctx.grad, grad_output), None


def under_functorch(x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def backend_for_functorch(name: str, backend, what: str) -> str:
    """torch.func transforms (grad, vmap, jacrev, ...) cannot see inside a fused kernel: the
    automatic choice falls back to the reference, an explicit fused backend is an error."""
    if name == "reference":
        return name
    if backend in (None, "auto"):
        return "reference"
    raise RuntimeError(f"dps_fast: {what} under a torch.func transform (grad, vmap, jacrev, ...) runs only on "
                       f"the reference backend, not {name!r}; use backend=None or 'reference'")


def attach_grad(loss: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``loss``, with ``d loss / d x = grad`` for autograd."""
    if torch.compiler.is_compiling():
        return torch.ops.dps_fast.attach_grad(loss, x, grad)
    return _Attach.apply(loss, x, grad)

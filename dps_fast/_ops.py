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
returns a copy of ``loss`` and whose backward is ``grad * grad_output`` (defined in C++,
csrc/ops.cpp, with its autograd node). The update therefore happens once per forward, in
the forward graph, also under ``torch.compile``; backward only scales.
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


def under_functorch(x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def _has_tangent(x: torch.Tensor) -> bool:
    """x carries a forward-mode tangent (a dual tensor of torch.autograd.forward_ad), which a
    fused kernel would drop."""
    if torch.compiler.is_compiling():
        return False
    forward_ad = torch.autograd.forward_ad
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(x).tangent is not None


def backend_for_autodiff(x: torch.Tensor, name: str, backend, what: str) -> str:
    """The backend for input ``x``: torch.func transforms (grad, vmap, jacrev, ...) and
    forward-mode AD cannot see inside a fused kernel, so under them the automatic choice
    falls back to the reference and an explicit fused backend is an error."""
    if name == "reference" or not (under_functorch(x) or _has_tangent(x)):
        return name
    if backend in (None, "auto"):
        return "reference"
    raise RuntimeError(f"dps_fast: {what} under a torch.func transform (grad, vmap, jacrev, ...) or forward-mode "
                       f"AD (dual tensors) runs only on the reference backend, not {name!r}; use backend=None or "
                       f"'reference'")


def attach_grad(loss: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``loss``, with ``d loss / d x = grad * grad_output`` for autograd (csrc/ops.cpp: a C++
    autograd node, eager and compiled alike; a second derivative through it is an error)."""
    return torch.ops.dps_fast.attach_grad.default(loss, x, grad)

"""Op registration shared by the fused backends: schemas and fake kernels.

Every fused op is defined once, by the C++ extension (``torch.ops.dps_fast``, CPU and
CUDA dispatch keys; the schema sits next to the CPU kernel); the Triton kernels register
the same schemas under ``torch.ops.dps_fast_triton``. The ops themselves (reference,
checks, fake kernel, public function) live one per module in :mod:`dps_fast.ops`, and what
they share at run time in :mod:`dps_fast.ops._common`.

Each forward op computes the loss *and* the gradient of the loss in one pass
(the gradient of a softmax cross-entropy is known in closed form). The DPS op
mutates the bank, so it cannot carry an autograd formula itself (``torch.library``
only differentiates functional ops). Instead the public API calls it on detached
inputs and then ``dps_fast::attach_grad(loss, x, grad)``
(:func:`dps_fast.ops._common.attach_grad`): a functional op that returns a copy of
``loss`` and whose backward is ``grad * grad_output`` (defined in C++, csrc/ops.cpp, with
its autograd node). The update therefore happens once per forward, in the forward graph,
also under ``torch.compile``; backward only scales.

Importing this module registers the fake kernels of the C++ ops (for torch.compile), once,
when the extension is loaded; ``dps_fast`` imports it.
"""
from __future__ import annotations

import torch

from . import _extension
from . import _validate
from .ops import MODULES


def op_modules():
    return MODULES


def kernels():
    """Every kernel op of every op module (their ``KERNELS``)."""
    return [kernel for mod in MODULES for kernel in mod.KERNELS]


def schema(op: str) -> str:
    """The schema of ``op`` (without its namespace) as the C++ extension defines it: the one
    definition, next to the op's CPU kernel."""
    return str(getattr(torch.ops.dps_fast, op).default._schema).split("::", 1)[1]


def register_fakes(namespace: str) -> None:
    """The shape functions of every fused op (for torch.compile / FakeTensor)."""
    for kernel in kernels():
        torch.library.register_fake(f"{namespace}::{kernel.name}", kernel.fake)


def register_check_index() -> None:
    """``dps_fast::check_index`` beyond its C++ CPU kernel: a fake (torch.compile) and the
    host-side check for CUDA tensors."""
    def fake(index, n):
        return torch.empty(index.shape, dtype=torch.int64, device=index.device)

    def on_cuda(index, n):
        _validate.index_values(index.cpu(), n)
        return index.to(torch.int64).clone()

    torch.library.register_fake("dps_fast::check_index", fake)
    torch.library.impl("dps_fast::check_index", "CUDA", on_cuda)


if _extension.load_error is None:
    register_fakes("dps_fast")
    register_check_index()

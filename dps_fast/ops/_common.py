"""What every fused op's Python side shares: compute dtypes, reductions, the gradient
buffer, the policy for an empty batch (docs/method.md §9), and the autograd glue (the
fallback under torch.func, :func:`attach_grad`)."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2


class Kernel(NamedTuple):
    """One kernel op of an op module (its ``KERNELS``): ``name``, its schema name (the schema is
    defined once, next to its CPU kernel in csrc/cpu/); ``fake``, its shape function for
    torch.compile; ``samples(device)``, the argument tuples torch.library.opcheck runs it on."""
    name: str
    fake: Callable
    samples: Callable


class BadInput(NamedTuple):
    """A call an op's checks refuse (its ``bad_inputs()``; tests/test_validation.py runs each on
    every backend): ``what`` it is, the keyword ``changes`` to the op's ``sample_call``, the
    ``error`` type every backend raises, before any write, and a regex of its ``message``."""
    what: str
    changes: dict
    error: type
    message: str


def compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()
    if reduction == "sum":
        return loss.sum()
    return loss


def logsumexp(z: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension, with the softmax as its autograd gradient.

    ``torch.logsumexp`` differentiates as ``exp(z - lse)``: once |z| is so large that ``lse``
    rounds to ``max(z)`` (|z| near the float32 maximum; in float64 too), that is 1 for every
    maximal entry instead of the softmax. Shifting by the (constant) row max keeps the
    gradient ``exp(z - m) / sum exp(z - m)`` exact (docs/method.md §9: such logits are finite
    and get the softmax gradient). A non-finite max shifts by 0, as torch.logsumexp does."""
    m = z.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m.squeeze(-1) + torch.log(torch.exp(z - m).sum(-1))


def soft_target_loss(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sum_j t_j * lse(z) - <t, z>`` over the last dimension, formed as
    ``2 sum_j t_j (lse/2 - z_j/2)``: terms >= 0 that cannot overflow for finite z, so the loss
    overflows only where the exact loss does, never ``inf - inf`` (docs/method.md §9). The
    kernels form it the same way."""
    half_gap = 0.5 * logsumexp(z)[..., None] - 0.5 * z
    return 2 * (t * half_gap).sum(-1)


def loss_shape(logits: torch.Tensor, reduction: int):
    return tuple(logits.shape[:-1]) if reduction == REDUCTION_NONE else ()


def empty_loss(logits: torch.Tensor, red: int) -> torch.Tensor:
    """The loss of an empty batch: 0, with a gradient of zeros."""
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    per_row = logits.to(cdt).sum(-1) * 0.0
    return per_row if red == REDUCTION_NONE else per_row.sum()


def needs_grad(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def in_backward_recompute() -> bool:
    """True while autograd re-runs a forward (activation checkpointing)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class GradCache:
    """One gradient buffer a fused CPU step reuses from step to step, owned by a bank.

    Why: a new [B, C] float32 buffer is fresh memory from the OS above glibc's mmap threshold
    (32 MB at most), so every page faults and is zeroed on first write: at [1024, 21,841]
    (89 MB) that cost 20 ms a step, as much as the top-k kernel itself (22 ms; 2-core VM,
    2026-12-07). The buffer is reused only when nothing else holds its storage (the previous
    step's autograd graph, a ``.grad`` that took it, a view of it): each step hands out a new
    view, so every holder counts on the storage. Buffers under FRESH_BYTES, GPU tensors (a
    caching allocator already) and torch without ``_storage_Use_Count`` get a new one every step."""

    # glibc serves any allocation above its largest mmap threshold (32 MiB on 64-bit) with fresh
    # pages; below it freed memory is reused and a new buffer costs nothing extra
    FRESH_BYTES = 32 << 20

    def __init__(self):
        self._buf: torch.Tensor | None = None

    @classmethod
    def pays_off(cls, x: torch.Tensor) -> bool:
        """True where reusing a buffer like x saves fresh pages: eager, on the CPU, at least
        FRESH_BYTES (below, a new buffer was as fast: [256, 1000] and [1024, 1000], 2026-12-07)."""
        return (not torch.compiler.is_compiling() and x.device.type == "cpu"
                and x.numel() * x.element_size() >= cls.FRESH_BYTES
                and hasattr(torch._C, "_storage_Use_Count") and not under_functorch(x))

    def empty_like(self, x: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous buffer of x's shape, dtype and device."""
        if not self.pays_off(x):
            return torch.empty_like(x, memory_format=torch.contiguous_format)
        buf = self._buf  # on the CPU, as x (pays_off)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype or not self._only_ours(buf):
            buf = self._buf = torch.empty_like(x, memory_format=torch.contiguous_format)
        return buf.view(x.shape)

    _SOLE_REFS: int | None = None  # the storage references of a tensor no one else holds

    @classmethod
    def _only_ours(cls, buf: torch.Tensor) -> bool:
        if cls._SOLE_REFS is None:
            cls._SOLE_REFS = _storage_refs(torch.empty(1))
        return _storage_refs(buf) == cls._SOLE_REFS

    def __deepcopy__(self, memo):  # a copied or pickled loss gets its own (empty) cache
        return GradCache()

    def __getstate__(self):
        return {"_buf": None}


def _storage_refs(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def grad_buffer(x: torch.Tensor, need: bool, inplace: bool, cache: GradCache | None = None) -> torch.Tensor:
    """Where a fused forward writes d loss / d x: a new buffer (``cache``'s where given), the
    logits' own storage (``inplace``), or nothing."""
    if not need:
        return x.new_empty((0,))
    if inplace:
        if torch.compiler.is_compiling():
            raise ValueError("inplace_grad=True is an eager-mode option; it cannot be compiled")
        if not x.is_contiguous():
            raise ValueError("inplace_grad=True needs contiguous logits")
        return x.detach()
    if cache is not None:
        return cache.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


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
    autograd node, eager and compiled alike; a second derivative through it is an error).
    Why it is an op of its own: dps_fast/_registration.py."""
    return torch.ops.dps_fast.attach_grad.default(loss, x, grad)

"""The top-k bank (docs/method.md §12): each row keeps k class ids, their concentrations and one
scalar ``rest``, the total concentration of the other C - k classes (spread evenly over them in
the implied dense row). This module holds the format's prior, its densification, the
reference step (the oracle the fused kernels are tested against; it computes in float32,
float64 when an input is float64, and follows the section literally) and the call of the fused
kernels (csrc/cpu/topk_step.cpp, dps_fast/kernels/topk_step.py, csrc/cuda/topk_step.cu).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _dispatch, _validate
from .ops._common import GradCache, attach_grad, backend_for_autodiff, grad_buffer, needs_grad, reduce
from .prior import prior_eps


@dataclass
class TopKRows:
    """Rows of a top-k bank: ``ids`` [N, k] (int64 here; int16 / int32 in storage), ``vals``
    [N, k] and ``rest`` [N]. The implied dense row is ``vals`` on ``ids`` and
    ``rest / (C - k)`` on every other class."""

    ids: torch.Tensor
    vals: torch.Tensor
    rest: torch.Tensor
    num_classes: int
    # the per-row bound on ||a - a~||_1 against a dense bank given the same evidence
    # (docs/method.md §12), or None when not tracked
    bound: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self.ids.shape[1]


def check_k(k: int, num_classes: int) -> int:
    """``k`` if it is an int in [1, C - 1] (the rest then covers at least one class)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < num_classes:
        raise ValueError(f"top_k must be an int in [1, C - 1] = [1, {num_classes - 1}], got {k!r}")
    return k


def topk_prior(labels: torch.Tensor, num_classes: int, k: int, c: float = 100.0, eps: float | None = None,
               off_label: float | None = None, dtype: torch.dtype = torch.float32,
               ids_dtype: torch.dtype = torch.int64, block_rows: int = 1 << 16,
               vals_dtype: torch.dtype | None = None) -> TopKRows:
    """The exact prior in top-k form: the label at ``c``, the other k - 1 slots (the smallest
    class ids other than the label) at ``eps``, and ``rest = eps * (C - k)``; its dense row is
    :func:`dps_fast.init_prior`'s. The ids are built in ``ids_dtype`` a block of rows at a time
    (no int64 copy of a whole bank); the values in ``vals_dtype`` (default ``dtype``, that of
    rest and bound)."""
    k = check_k(k, num_classes)
    eps = prior_eps(num_classes, c, eps, off_label)
    labels = torch.as_tensor(labels).to(torch.int64)
    n = labels.shape[0]
    ids = torch.empty((n, k), dtype=ids_dtype, device=labels.device)
    slots = torch.arange(k - 1, device=labels.device)
    for r in range(0, n, block_rows):
        lab = labels[r:r + block_rows, None]
        ids[r:r + block_rows, 0:1] = lab
        ids[r:r + block_rows, 1:] = slots + (slots >= lab).to(torch.int64)  # skip the label's own id
    vals = torch.full((n, k), float(eps), dtype=vals_dtype or dtype, device=labels.device)
    vals[:, 0] = float(c)
    rest = torch.full((n,), float(eps) * (num_classes - k), dtype=dtype, device=labels.device)
    return TopKRows(ids, vals, rest, num_classes, torch.zeros(n, dtype=dtype, device=labels.device))


VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_values_dtype(dtype: torch.dtype, c: float, eps: float) -> None:
    """A bank's values dtype: float32, bfloat16 or float16 (rest and bound stay float32, the
    step computes in float32 and rounds the written values), in which the prior's c and eps
    are finite and > 0."""
    if dtype not in VALUE_DTYPES:
        raise TypeError(f"top_k: the bank's values are float32, bfloat16 or float16, got {dtype}")
    probe = torch.tensor([float(c), float(eps)], dtype=torch.float64).to(dtype)
    if not bool((torch.isfinite(probe) & (probe > 0)).all()):
        raise ValueError(f"top_k: the prior's c = {c} and eps = {eps:.3g} are not both finite and > 0 in {dtype}; "
                         f"use bank_dtype=torch.float32")


def step_bound(K, val, rest, p, gamma: float, new_K, new_rest) -> torch.Tensor:
    """delta [B] of one step (docs/method.md §12): twice the evidence mass outside K' plus
    twice the dropped entries' excess over the new uniform level; the L1 distance to a dense
    bank grows by at most this after the discount gamma."""
    num_classes, k = p.shape[1], K.shape[1]
    implied = gamma * densify(K, val, rest, num_classes) + p
    kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, new_K, True)
    level = (new_rest / (num_classes - k))[:, None]
    excess = torch.where(kept, 0.0, (implied - level).clamp_min(0)).sum(1)
    return 2 * (torch.where(kept, 0.0, p).sum(1) + excess)


def densify(ids: torch.Tensor, vals: torch.Tensor, rest: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The implied dense rows [n, C]: ``vals`` on ``ids``, ``rest / (C - k)`` elsewhere."""
    k = ids.shape[1]
    dense = (rest / (num_classes - k))[:, None].expand(-1, num_classes).clone()
    return dense.scatter_(1, ids.to(torch.int64), vals.to(dense.dtype))


def top_by_value(values: torch.Tensor, class_ids: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest ``values`` per row, ties to the smaller class id (the tie
    rule every backend must follow): a stable sort by id, then a stable sort by value."""
    by_id = torch.sort(class_ids, dim=1, stable=True).indices
    v = values.gather(1, by_id)
    by_value = torch.sort(v, dim=1, descending=True, stable=True).indices
    return by_id.gather(1, by_value[:, :k])


def top_positions(values: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`top_by_value` for class ids 0 .. C - 1 (the positions), in O(C) a row instead of
    a sort: the k-th largest value by ``torch.topk``, every value above it, and of the values
    equal to it the ones of smallest position. (With a stable sort instead, the reference step at
    [1024, 21,841], k = 32 took 2.13 s; with this, 1.45 s: 2-core VM, 2026-12-07,
    tools/topk_scale.py.) The positions come back in no particular order."""
    num = values.shape[1]
    kth = torch.topk(values, k, dim=1, sorted=False).values.amin(1, keepdim=True)
    above, tie = values > kth, values == kth
    need = k - above.sum(1, keepdim=True)
    take = above | (tie & (tie.cumsum(1) <= need))
    key = take * (num - torch.arange(num, device=values.device))  # taken positions > 0, unique
    return torch.topk(key, k, dim=1, sorted=False).indices


def evidence(logits: torch.Tensor, tau_e: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(p [B, C], bad [B]): the mean over views of softmax(z_v / tau_e) (docs/method.md §2), and
    the rows with a non-finite logit in any view."""
    z3 = logits if logits.dim() == 3 else logits.unsqueeze(0)
    bad = ~torch.isfinite(z3).all(-1).all(0)
    shifted = z3 - torch.where(bad[None, :, None], 0.0, z3.amax(-1, keepdim=True))
    return torch.softmax(shifted / tau_e, dim=-1).mean(0), bad


# docs/method.md §12's tie rule: a slot of K whose value is within this relative distance of the
# level outside K is ordered as if it were the level (the two are often equal in exact arithmetic
# but reached along different roundings; a float32 sum of C terms is off by ~1e-6 relative), so
# that every backend, in float32 or float64, keeps the same K'. Every backend uses this value.
SNAP = 1e-5


def topk_update(K, val, rest, p, gamma: float):
    """Steps 1-4 of docs/method.md §12 for rows (K, val, rest) [B, k], [B, k], [B] and
    evidence p [B, C]: returns (K', b on K', rest'). Every term of rest' is >= 0, and the new
    mass sum(b on K') + rest' is gamma * (sum(val) + rest) + sum(p), as for the dense bank."""
    num_classes, k = p.shape[1], K.shape[1]
    level = rest / (num_classes - k)                                        # implied value outside K
    b_in = gamma * val + p.gather(1, K)                                     # 1. b_i, i in K
    outside = torch.ones_like(p, dtype=torch.bool).scatter_(1, K, False)
    J = top_positions(torch.where(outside, p, float("-inf")), min(k, num_classes - k))  # 2. J, outside K
    p_J = p.gather(1, J)
    cand_ids, cand_b = torch.cat([K, J], 1), torch.cat([b_in, gamma * level[:, None] + p_J], 1)
    near = (val - level[:, None]).abs() <= SNAP * level[:, None]            # the tie rule's ordering key
    key_in = gamma * torch.where(near, level[:, None], val) + p.gather(1, K)
    pick = top_by_value(torch.cat([key_in, cand_b[:, k:]], 1), cand_ids, k)  # 3. K'
    chosen = torch.zeros_like(cand_b, dtype=torch.bool).scatter_(1, pick, True)
    kept, admitted = chosen[:, :k], chosen[:, k:]
    n_adm = admitted.sum(1)                                                 # 4. rest'
    new_rest = (gamma * level * (num_classes - k - n_adm) + ((p * outside).sum(1) - (p_J * admitted).sum(1))
                + (b_in * ~kept).sum(1))
    return cand_ids.gather(1, pick), cand_b.gather(1, pick), new_rest


def topk_loss(logits3: torch.Tensor, K: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per view and row [V, B], the cross-entropy of softmax(z) against the implied target
    (t on K, u elsewhere), without a dense target: log s + sum_{K} (t_i - u)(m - z_i)
    + u sum_j (m - z_j), every term >= 0 (m = max z, s = sum exp(z - m)). m is taken as a
    constant, so autograd's gradient is softmax(z) - u - [j in K](t_j - u)."""
    m = logits3.detach().amax(-1, keepdim=True)
    log_s = torch.log(torch.exp(logits3 - m).sum(-1))
    z_K = logits3.gather(-1, K.expand(logits3.shape[0], -1, -1))
    on_k = ((t - u[:, None]) * (m - z_K)).sum(-1)
    return log_s + on_k + u * (m - logits3).sum(-1)  # sum_j (m - z_j): terms >= 0, no inf - inf


@torch.no_grad()
def _step_rows(bank: TopKRows, idx, p, bad, gamma, posterior):
    """The batch's rows before and after the update, and its target (t on K, u elsewhere)."""
    num_classes, k = bank.num_classes, bank.k
    cdt = p.dtype
    K, val, rest = bank.ids[idx].to(torch.int64), bank.vals[idx].to(cdt), bank.rest[idx].to(cdt)
    new_K, new_b, new_rest = topk_update(K, val, rest, p, gamma)
    new_K = torch.where(bad[:, None], K, new_K)
    new_b = torch.where(bad[:, None], val, new_b)
    new_rest = torch.where(bad, rest, new_rest)
    tK, tv, tr = (new_K, new_b, new_rest) if posterior else (K, val, rest)
    mass = tv.sum(1) + tr
    return (new_K, new_b, new_rest), tK, tv / mass[:, None], tr / ((num_classes - k) * mass)


def reference_step(logits, index, bank: TopKRows, gamma=0.95, tau_e=1.0, target="posterior",
                   reduction="mean", update=True):
    """One DPS step on a top-k bank (docs/method.md §12), in plain PyTorch: the loss (with its
    gradient through autograd), the rows ``index`` of ``bank`` updated in place when
    ``update``. A row with a non-finite logit in any view, or an id outside [0, N), keeps its
    state; its loss and gradient are NaN (docs/method.md §9)."""
    _validate.target_name(target)
    cdt = torch.float64 if torch.float64 in (logits.dtype, bank.vals.dtype) else torch.float32
    z3 = (logits if logits.dim() == 3 else logits.unsqueeze(0)).to(cdt)
    idx = index.to(torch.int64)
    inside = (idx >= 0) & (idx < bank.ids.shape[0])
    safe = torch.where(inside, idx, torch.zeros_like(idx))
    with torch.no_grad():
        p, bad = evidence(z3.detach(), tau_e)
        bad = bad | ~inside
        (new_K, new_b, new_rest), tK, t, u = _step_rows(bank, safe, p, bad, gamma, target == "posterior")
        if update:
            good = safe[~bad]
            if bank.bound is not None:
                K, val, rest = bank.ids[good].to(torch.int64), bank.vals[good].to(cdt), bank.rest[good].to(cdt)
                delta = step_bound(K, val, rest, p[~bad], gamma, new_K[~bad], new_rest[~bad])
                bank.bound[good] = (gamma * bank.bound[good].to(cdt) + delta).to(bank.bound.dtype)
            bank.ids[good] = new_K[~bad].to(bank.ids.dtype)
            bank.vals[good] = new_b[~bad].to(bank.vals.dtype)
            bank.rest[good] = new_rest[~bad].to(bank.rest.dtype)
        nan_pad = torch.where(bad, float("nan"), 0.0).to(cdt)[None, :, None]
    loss = topk_loss(z3 + nan_pad, tK, t, u)  # NaN loss and gradient for a row that kept its state
    if logits.dim() == 2:
        loss = loss[0]
    return reduce(loss, reduction)


# where a step named backend="triton" takes the Triton kernel (dps_fast/kernels/topk_step.py):
# rows whose membership tests, [next power of two of C, of k], hold at most this many cells
# ([1024, 1000], k = 8 compiles for sm_90 without spills, 177 registers; C = 4096, k = 32 spills
# 44 KB a thread: tools/triton_aot_check.py, triton 3.8); larger rows take the reference (the
# kernel itself runs up to 32,768 classes, in the interpreter's tests). The automatic choice
# never takes it until it has run on a GPU.
TRITON_MAX_CELLS = 8192
# the CUDA kernel's shared-memory limits (csrc/cuda/topk_step.h: kTopkMaxC, kTopkMaxK, kTopkMaxViews)
CUDA_MAX_C, CUDA_MAX_K, CUDA_MAX_VIEWS = 32768, 256, 8


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def fused_backend(logits: torch.Tensor, bank: TopKRows, backend) -> str | None:
    """The fused kernel for this step, or None for :func:`reference_step`: ``"cpu"``
    (``dps_fast::topk_step``, csrc/cpu/topk_step.cpp) for CPU tensors; on a GPU only where
    the backend is named, since neither GPU kernel has run on one yet (the automatic choice on
    CUDA is the reference): ``"triton"`` (dps_fast/kernels/topk_step.py, rows within
    TRITON_MAX_CELLS; CPU tensors too, in Triton's interpreter) and ``"cuda"``
    (csrc/cuda/topk_step.cu: C <= 32,768, k <= 256, at most 8 views). Float32 values, fused
    logit dtypes, eager mode, no torch.func transform."""
    if torch.compiler.is_compiling() or bank.vals.dtype != torch.float32:
        return None
    if logits.dtype not in _validate.FUSED_DTYPES:
        return None
    name = _dispatch.resolve(backend, logits.device, (logits.dtype,))
    name = backend_for_autodiff(logits, name, backend, "the top-k step")
    c, views = logits.shape[-1], logits.shape[0] if logits.dim() == 3 else 1
    if name == "cpu" or (name == backend == "triton" and _pow2(c) * _pow2(bank.k) <= TRITON_MAX_CELLS):
        return name
    if name == backend == "cuda" and c <= CUDA_MAX_C and bank.k <= CUDA_MAX_K and views <= CUDA_MAX_VIEWS:
        return name
    return None


def fused_step(logits, index, bank: TopKRows, gamma=0.95, tau_e=1.0, target="posterior", reduction="mean",
               update=True, backend: str = "cpu", grad_cache: GradCache | None = None):
    """:func:`reference_step` on a fused kernel, ``backend`` "cpu", "triton" or "cuda" (the
    same arguments and results; the bank's ids int64). Used where :func:`fused_backend` says so.
    The gradient goes into ``grad_cache``'s buffer where one is given (the bank's)."""
    z3 = (logits if logits.dim() == 3 else logits.unsqueeze(0)).detach().float().contiguous()
    need = needs_grad(logits)
    grad = grad_buffer(z3, need, False, grad_cache)
    bound = bank.bound if bank.bound is not None else bank.vals.new_empty((0,))
    loss = _dispatch.op(backend, "topk_step")(z3, index.to(torch.int64).contiguous(), bank.ids, bank.vals, bank.rest,
                                              bound, grad, float(gamma), float(tau_e), target == "posterior",
                                              bool(update), _validate.REDUCTIONS[reduction])
    if reduction == "none" and logits.dim() == 2:
        loss = loss[0]
    return attach_grad(loss, logits, grad.view(logits.shape).to(logits.dtype)) if need else loss

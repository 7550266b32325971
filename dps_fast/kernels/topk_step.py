"""Triton kernel of the top-k bank's step (docs/method.md §12; issue 26), for rows that fit on
chip: one program per sample holds its whole row of logits (C <= MAX_C), so the logits are read
from global memory once per view for the statistics and once more for the gradient. It
follows dps_fast/topk.py::reference_step (the oracle) step by step, in float32:

1. the evidence p (the mean over views of softmax(z_v / tau_e)); a row with a non-finite
   logit, or an id outside [0, N), keeps its state and gets a NaN loss and gradient;
2. J, the min(k, C - k) classes outside K with the largest p, picked one at a time (ties to
   the smaller class id), then K', the k best of the 2k candidates by the same rule: the same
   K' as the reference and the CPU kernel wherever the candidates' values are the same;
3. rest' by the reference's formula, the bound's delta on the dense implied update, and the
   loss and gradient against the implied target (t on K', u elsewhere), with no dense target.

Membership of a class in K (or K') is a [BLOCK_C, KP] comparison: simple and exact, made for
the interpreter and small k; a GPU version at the byte limit (issue 25's design: split-C
beyond the chip, a running top-k) is still to come, and nothing here has run on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_C = 32768  # one row on chip; beyond, no Triton top-k step (dps_fast/topk.py takes it only for small rows)


@triton.jit
def _best_of(v, ids, ok):
    """The best of one set by (value descending, class id ascending): its value, id and mask."""
    mx = tl.max(tl.where(ok, v, float("-inf")), 0)
    bid = tl.min(tl.where(ok & (v == mx), ids, 2147483647), 0)
    return mx, bid, ok & (ids == bid)


@triton.jit
def _best(v_a, id_a, ok_a, v_b, id_b, ok_b):
    """The best candidate of two sets by (value descending, class id ascending): its value and
    id, and masks of where it sits in each set."""
    mx = tl.maximum(tl.max(tl.where(ok_a, v_a, float("-inf")), 0), tl.max(tl.where(ok_b, v_b, float("-inf")), 0))
    big = 2147483647
    bid = tl.minimum(tl.min(tl.where(ok_a & (v_a == mx), id_a, big), 0),
                     tl.min(tl.where(ok_b & (v_b == mx), id_b, big), 0))
    return mx, bid, ok_a & (id_a == bid), ok_b & (id_b == bid)


@triton.jit
def _evidence(Z, b, B, C, cols, cmask, ok, inv_tau_e, V: tl.constexpr, BLOCK_C: tl.constexpr):
    """Step 0: p, the mean over views of softmax(z_v / tau_e), and whether the row's logits are
    all finite (and ``ok``)."""
    p = tl.zeros([BLOCK_C], dtype=tl.float32)
    for v in tl.static_range(V):
        z = tl.load(Z + (v * B + b) * C + cols, mask=cmask, other=0.0).to(tl.float32)
        ok = ok & (tl.sum(tl.where(cmask & ((z != z) | (tl.abs(z) == float("inf"))), 1, 0), 0) == 0)
        e = tl.where(cmask, tl.exp((z - tl.max(tl.where(cmask, z, float("-inf")), 0)) * inv_tau_e), 0.0)
        p += e / tl.sum(e, 0)
    return p / V, ok


@triton.jit
def _update(p, cols, cmask, Kid, val, rest, gamma, C, slot, K: tl.constexpr, KP: tl.constexpr):
    """Steps 1-4 of docs/method.md §12: K' and b' (slot order: value descending, id ascending),
    rest', and the [BLOCK_C, KP] membership of K."""
    level = rest / (C - K)
    hit = cols[:, None] == Kid[None, :]                       # class j is slot i of K
    in_k = tl.sum(tl.where(hit, 1, 0), 1) > 0
    p_k = tl.sum(tl.where(hit, p[:, None], 0.0), 0)
    b_in = gamma * val + p_k                                                      # step 1
    # the tie rule's ordering key (dps_fast/topk.py::SNAP = 1e-5): a slot within rounding of the level is the level;
    # keys at the level are one explicit fma, as J's are, so that the compiler's fusion cannot split a tie
    near = tl.abs(val - level) <= 1e-5 * level
    key_in = tl.where(near, tl.fma(gamma + tl.zeros_like(p_k), level, p_k), gamma * val + p_k)
    n_j = tl.minimum(K, C - K)                                                    # step 2: J
    free = cmask & ~in_k
    j_id = tl.full([KP], -1, tl.int32)
    p_j = tl.zeros([KP], dtype=tl.float32)
    for i in range(0, n_j):
        mx, bid, at_c = _best_of(p, cols, free)
        j_id, p_j, free = tl.where(slot == i, bid, j_id), tl.where(slot == i, mx, p_j), free & ~at_c
    b_j = tl.fma(gamma + tl.zeros_like(p_j), level, p_j)
    ok_k, ok_j = slot < K, slot < n_j                                             # step 3: K'
    new_id = tl.full([KP], -1, tl.int32)
    new_b = tl.zeros([KP], dtype=tl.float32)
    for i in range(0, K):
        mx, bid, at_k, at_j = _best(key_in, Kid, ok_k, b_j, j_id, ok_j)
        chosen = tl.where(tl.sum(tl.where(at_k, 1, 0), 0) > 0, tl.sum(tl.where(at_k, b_in, 0.0), 0), mx)
        new_id, new_b = tl.where(slot == i, bid, new_id), tl.where(slot == i, chosen, new_b)
        ok_k, ok_j = ok_k & ~at_k, ok_j & ~at_j
    admitted = (slot < n_j) & ~ok_j                   # step 4 (ok_k now marks the dropped slots of K)
    n_adm = tl.sum(tl.where(admitted, 1, 0), 0)
    p_out = tl.sum(tl.where(cmask & ~in_k, p, 0.0), 0)
    new_rest = (gamma * level * (C - K - n_adm) + (p_out - tl.sum(tl.where(admitted, p_j, 0.0), 0))
                + tl.sum(tl.where(ok_k, b_in, 0.0), 0))
    return new_id, new_b, new_rest, hit, in_k


@triton.jit
def _bound_delta(p, cmask, hit, in_k, val, rest, gamma, new_hit, new_rest, C, K: tl.constexpr):
    """The bound's delta: twice the evidence outside K' and the excess over the new level of the
    implied dense update outside K' (dps_fast/topk.py::step_bound)."""
    implied = gamma * tl.where(in_k, tl.sum(tl.where(hit, val[None, :], 0.0), 1), rest / (C - K)) + p
    outside = cmask & ~(tl.sum(tl.where(new_hit, 1, 0), 1) > 0)
    excess = tl.where(outside, tl.maximum(implied - new_rest / (C - K), 0.0), 0.0)
    return 2 * (tl.sum(tl.where(outside, p, 0.0), 0) + tl.sum(excess, 0))


@triton.jit
def _outputs(Z, G, LOSS, b, B, C, cols, cmask, ok, t_hit, t, u, smask, gscale, V: tl.constexpr,
             HAS_GRAD: tl.constexpr):
    """Per view, the loss log s + sum_K' (t - u)(m - z) + u sum_j (m - z_j) and the gradient
    (softmax - u - [j in K'](t_j - u)) * gscale; NaN where the row is not ``ok``."""
    t_dense = tl.sum(tl.where(t_hit, (t - u)[None, :], 0.0), 1)
    for v in tl.static_range(V):
        z = tl.load(Z + (v * B + b) * C + cols, mask=cmask, other=0.0).to(tl.float32)
        m = tl.max(tl.where(cmask, z, float("-inf")), 0)
        e = tl.where(cmask, tl.exp(z - m), 0.0)
        s = tl.sum(e, 0)
        z_t = tl.sum(tl.where(t_hit, z[:, None], 0.0), 0)
        on_k = tl.sum(tl.where(smask, (t - u) * (m - z_t), 0.0), 0)
        loss = tl.log(s) + on_k + u * tl.sum(tl.where(cmask, m - z, 0.0), 0)  # terms >= 0: no inf - inf
        tl.store(LOSS + v * B + b, tl.where(ok, loss, float("nan")))
        if HAS_GRAD:
            g = (e / s - u - t_dense) * gscale
            tl.store(G + (v * B + b) * C + cols, tl.where(ok, g, float("nan")), mask=cmask)


@triton.jit
def _topk_step_kernel(Z, IDX, IDS, VALS, REST, BOUND, G, LOSS, B, C, N, gamma, inv_tau_e, gscale,
                      K: tl.constexpr, KP: tl.constexpr, V: tl.constexpr, BLOCK_C: tl.constexpr,
                      HAS_BOUND: tl.constexpr, HAS_GRAD: tl.constexpr, POSTERIOR: tl.constexpr,
                      UPDATE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rid = tl.load(IDX + b).to(tl.int64)
    inside = (rid >= 0) & (rid < N)
    row = tl.where(inside, rid, 0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    p, ok = _evidence(Z, b, B, C, cols, cmask, inside, inv_tau_e, V, BLOCK_C)
    slot = tl.arange(0, KP)
    smask = slot < K
    Kid = tl.load(IDS + row * K + slot, mask=smask, other=-1).to(tl.int32)  # -1 in padding slots
    val = tl.load(VALS + row * K + slot, mask=smask, other=0.0)
    rest = tl.load(REST + row)
    new_id, new_b, new_rest, hit, in_k = _update(p, cols, cmask, Kid, val, rest, gamma, C, slot, K, KP)
    new_hit = cols[:, None] == new_id[None, :]
    if POSTERIOR:  # the target: t on tK, u elsewhere
        t_v, t_r, t_hit = new_b, new_rest, new_hit
    else:
        t_v, t_r, t_hit = val, rest, hit
    mass = tl.sum(tl.where(smask, t_v, 0.0), 0) + t_r
    _outputs(Z, G, LOSS, b, B, C, cols, cmask, ok, t_hit, t_v / mass, t_r / ((C - K) * mass), smask, gscale, V,
             HAS_GRAD)
    if UPDATE:
        tl.store(IDS + row * K + slot, new_id.to(tl.int64), mask=smask & ok)
        tl.store(VALS + row * K + slot, new_b, mask=smask & ok)
        tl.store(REST + row, new_rest, mask=ok)
        if HAS_BOUND:
            delta = _bound_delta(p, cmask, hit, in_k, val, rest, gamma, new_hit, new_rest, C, K)
            tl.store(BOUND + row, gamma * tl.load(BOUND + row) + delta, mask=ok)


def _check_args(logits, index, ids, vals, rest, bound, grad) -> None:
    """csrc/cpu/topk_step.cpp::check_topk_args, for the Triton op (called directly, it must not
    read or write outside its tensors), and the on-chip limit."""
    def need(ok, what):
        if not ok:
            raise ValueError(f"dps_fast: topk_step's {what} (dps_fast/topk.py::fused_step prepares them)")
    tensors = (logits, index, ids, vals, rest, bound, grad)
    need(all(t.is_contiguous() and t.device == logits.device for t in tensors), "tensors must be contiguous, "
         "on one device")
    need(logits.dim() == 3 and logits.dtype == torch.float32 and logits.shape[0] >= 1,
         "logits must be float32 [V, B, C], V >= 1")
    v, b, c = logits.shape
    need(index.dtype == torch.int64 and index.numel() == b, "index must be int64 [B]")
    need(ids.dtype == torch.int64 and ids.dim() == 2 and 1 <= ids.shape[1] < c, "ids must be int64 [N, k], 1 <= k < C")
    need(vals.dtype == torch.float32 and vals.shape == ids.shape, "vals must be float32 [N, k]")
    n = ids.shape[0]
    need(rest.dtype == torch.float32 and tuple(rest.shape) == (n,), "rest must be float32 [N]")
    need(bound.numel() == 0 or (bound.dtype == torch.float32 and tuple(bound.shape) == (n,)),
         "bound must be float32 [N] or empty")
    need(grad.numel() == 0 or (grad.dtype == torch.float32 and grad.shape == logits.shape),
         "grad must be float32 like the logits, or empty")
    need(c <= MAX_C, f"row must fit on chip: C <= {MAX_C} in the Triton kernel, got C = {c}")


def _warps(block_c: int) -> int:
    """Warps of a program: a row of BLOCK_C floats spread over 32 * warps threads."""
    return 4 if block_c <= 512 else 8 if block_c <= 4096 else 16


def topk_step(logits, index, ids, vals, rest, bound, grad, gamma, tau_e, posterior, update, reduction):
    """``dps_fast::topk_step`` (csrc/cpu/topk_step.cpp's schema and results) on the Triton kernel:
    the loss [V, B] (reduction 0) or its mean / sum; the bank rows ``index`` and ``grad`` written
    in place. Rows longer than MAX_C are refused (the caller takes the reference)."""
    _check_args(logits, index, ids, vals, rest, bound, grad)
    v, b, c = logits.shape
    k = ids.shape[1]
    loss = torch.empty((v, b), dtype=torch.float32, device=logits.device)
    gscale = 1.0 / (v * b) if reduction == 1 else 1.0
    if b:
        if update:
            for t in (ids, vals, rest) + ((bound,) if bound.numel() else ()):
                torch.autograd.graph.increment_version(t)
        block_c = triton.next_power_of_2(c)
        _topk_step_kernel[(b,)](logits, index, ids, vals, rest, bound, grad, loss, b, c, ids.shape[0], float(gamma),
                                1.0 / float(tau_e), gscale, K=k, KP=triton.next_power_of_2(k), V=v,
                                BLOCK_C=block_c, HAS_BOUND=bound.numel() > 0, HAS_GRAD=grad.numel() > 0,
                                POSTERIOR=bool(posterior), UPDATE=bool(update), num_warps=_warps(block_c))
    if reduction == 0:
        return loss
    total = loss.double().sum()
    return (total / (v * b) if reduction == 1 else total).float()


# ---------------------------------------------------------------------------- ahead-of-time check
def aot_cases():
    """The configurations tools/triton_aot_check.py compiles for sm_90 (no GPU needed), small C
    only: at [1024, 10,000] and [1024, 21,841], k = 32, the kernel compiles but spills 90 KB
    and 208 KB a thread (16 warps; about 5 minutes to compile each, triton 3.8, 2026-12-07),
    the [BLOCK_C, KP] membership tests being made for correctness, not for the chip (issue
    25's design, a running top-k over column blocks, is still to come)."""
    return [dict(name="topk 1024x1000 k8", shape=[1, 1024, 1000], k=8),
            dict(name="topk 2 views 1024x1000 k8", shape=[2, 1024, 1000], k=8)]


def aot_signature(case):
    """(jit function, argument types, constexprs, launch config) of one AOT case."""
    v, _, c = case["shape"]
    block_c = triton.next_power_of_2(c)
    types = dict(Z="*fp32", IDX="*i64", IDS="*i64", VALS="*fp32", REST="*fp32", BOUND="*fp32", G="*fp32",
                 LOSS="*fp32", B="i32", C="i32", N="i32", gamma="fp32", inv_tau_e="fp32", gscale="fp32")
    const = dict(K=case["k"], KP=triton.next_power_of_2(case["k"]), V=v, BLOCK_C=block_c, HAS_BOUND=True,
                 HAS_GRAD=True, POSTERIOR=True, UPDATE=True)
    return _topk_step_kernel, types, const, dict(BLOCK_C=block_c, num_warps=_warps(block_c))

"""Triton kernels: flash-style SupCon / NT-Xent (docs/method.md §4), forward and gradient.

The M x M similarity matrix is never materialised. The forward kernel walks
tiles ``[BLOCK_M, BLOCK_N]`` of ``S = F F^T / tau`` with an online logsumexp over
``j != i`` and accumulates the positive-weight sums; the gradient kernel
recomputes the tiles and forms ``dF_i = (1/tau) sum_j (G_ij + G_ji) F_j`` from the
per-row statistics (S and the weights are symmetric, so both terms come from the
same tile). Memory: O(M d).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._rounding import to_dtype

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _weights(LAB, T, ri, rj, mi, mj, K, HARD: tl.constexpr, BLOCK_K: tl.constexpr):
    if HARD:
        li = tl.load(LAB + ri, mask=mi, other=-1)
        lj = tl.load(LAB + rj, mask=mj, other=-2)
        w = (li[:, None] == lj[None, :]).to(tl.float32)
    else:
        # soft positive weights <t_i, t_j>, BLOCK_K classes at a time (any number of classes)
        w = tl.zeros([ri.shape[0], rj.shape[0]], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            ti = tl.load(T + ri[:, None] * K + kk[None, :], mask=mi[:, None] & (kk < K)[None, :], other=0.0)
            tj = tl.load(T + rj[:, None] * K + kk[None, :], mask=mj[:, None] & (kk < K)[None, :], other=0.0)
            w += tl.dot(ti, tl.trans(tj), input_precision="ieee")
    keep = mi[:, None] & mj[None, :] & (ri[:, None] != rj[None, :])
    return tl.where(keep, w, 0.0)


@triton.jit
def _rows(F, r, m, dd, D):
    """Rows r of F [M, D] (zero outside the matrix), float32."""
    return tl.load(F + r[:, None] * D + dd[None, :], mask=m[:, None] & (dd < D)[None, :], other=0.0)


@triton.jit
def _s_tile(F, ri, mi, rj, mj, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DCHUNK: tl.constexpr):
    """F_i F_j^T over the whole feature width, DCHUNK features at a time: with the whole
    [BLOCK_M, D] row block held across the loop, ptxas (sm_90) spilled 0.4-2.5 kB per thread;
    chunked, nothing."""
    dk = tl.arange(0, DCHUNK)
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, DCHUNK):
        s += tl.dot(_rows(F, ri, mi, d0 + dk, D), tl.trans(_rows(F, rj, mj, d0 + dk, D)), input_precision="ieee")
    return s


@triton.jit
def _supcon_fwd_kernel(F, LAB, T, LSE, WSUM, WDOT, M, D, K, inv_tau,
                       HARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, DCHUNK: tl.constexpr):
    pid = tl.program_id(0)
    ri = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mi = ri < M
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    wsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    wdot = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, M, BLOCK_N):
        rj = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mj = rj < M
        s = _s_tile(F, ri, mi, rj, mj, D, BLOCK_M, BLOCK_N, DCHUNK) * inv_tau
        valid = mi[:, None] & mj[None, :] & (ri[:, None] != rj[None, :])
        sm = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(sm, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.where(valid, tl.exp(s - m_safe[:, None]), 0.0), 1)
        m = m_new
        w = _weights(LAB, T, ri, rj, mi, mj, K, HARD, BLOCK_K)
        wsum += tl.sum(w, 1)
        wdot += tl.sum(w * tl.where(valid, s, 0.0), 1)
    lse = tl.where(l > 0, m + tl.log(l), 0.0)
    tl.store(LSE + ri, lse, mask=mi)
    tl.store(WSUM + ri, wsum, mask=mi)
    tl.store(WDOT + ri, wdot, mask=mi)


@triton.jit
def _supcon_bwd_kernel(F, LAB, T, LSE, COEF, INVW, DF, M, D, K, inv_tau,
                       HARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, DCHUNK: tl.constexpr,
                       SLICED: tl.constexpr):
    """dF for rows [BLOCK_M] and features [BLOCK_D] (program (i, k): slice k of the feature
    width, as the CUDA kernel's DSLICE). SLICED (D > BLOCK_D): each slice recomputes the S tile
    over the whole width in DCHUNK steps; else f_i is held and S is one product."""
    pid = tl.program_id(0)
    ri = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mi = ri < M
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = (dd < D)[None, :]
    if not SLICED:
        fi = _rows(F, ri, mi, dd, D)
    lse_i = tl.load(LSE + ri, mask=mi, other=0.0)
    c_i = tl.load(COEF + ri, mask=mi, other=0.0)
    iw_i = tl.load(INVW + ri, mask=mi, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, M, BLOCK_N):
        rj = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mj = rj < M
        fj = _rows(F, rj, mj, dd, D)
        lse_j = tl.load(LSE + rj, mask=mj, other=0.0)
        c_j = tl.load(COEF + rj, mask=mj, other=0.0)
        iw_j = tl.load(INVW + rj, mask=mj, other=0.0)
        if SLICED:
            s = _s_tile(F, ri, mi, rj, mj, D, BLOCK_M, BLOCK_N, DCHUNK) * inv_tau
        else:
            s = tl.dot(fi, tl.trans(fj), input_precision="ieee") * inv_tau
        valid = mi[:, None] & mj[None, :] & (ri[:, None] != rj[None, :])
        w = _weights(LAB, T, ri, rj, mi, mj, K, HARD, BLOCK_K)
        p_ij = tl.where(valid, tl.exp(s - lse_i[:, None]), 0.0)
        p_ji = tl.where(valid, tl.exp(s - lse_j[None, :]), 0.0)
        g = c_i[:, None] * (p_ij - w * iw_i[:, None]) + c_j[None, :] * (p_ji - w * iw_j[None, :])
        acc += tl.dot(g, fj, input_precision="ieee")
    tl.store(DF + ri[:, None] * D + dd[None, :], to_dtype(acc * inv_tau, DF.dtype.element_ty), mask=mi[:, None] & dmask)


def _dchunk(block_d: int) -> int:
    """Features per step of an S-tile product over the whole width (_s_tile; in the interpreter
    one step per BLOCK_D)."""
    return block_d if _INTERPRET else min(32, block_d)


BWD_DMAX = 256  # features per backward program; see _blocks


def _blocks(m: int, d: int, k: int):
    """Backward tiles (BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, warps). BLOCK_K is the class chunk
    of the soft weights. Sizes checked for spills by tools/triton_aot_check.py (sm_90)."""
    # BLOCK_D capped: at next_pow2(d) with no cap the backward needed 330 kB of shared memory
    # at d = 1024 and 657 kB at d = 1025 (sm_90 has 227 kB): OutOfResources for any d > 512.
    # Wider d runs ceil(d / BLOCK_D) slices. The interpreter keeps the same cap, so that the
    # tests run the sliced kernel as the GPU does.
    bd = max(16, min(triton.next_power_of_2(d), BWD_DMAX))
    if _INTERPRET:  # few, large programs; one class chunk
        bm = max(16, min(triton.next_power_of_2(m), 256))
        return bm, bm, bd, max(16, triton.next_power_of_2(max(k, 1))), 4
    bk = 32  # class chunk: 16 left ptxas at 128 registers with a 36-byte spill (k=10, sm_90)
    # the backward keeps f_i and dF_i ([BLOCK_M, BLOCK_D] each) in registers across the loop
    if bd <= 128:
        return 32, 64, bd, bk, 8
    # BLOCK_D = 256, one slice or several. Compiled for sm_90 with the runtime's alignment
    # specialisation, 16 x 32 x 8 warps (used before) spilled 4-12 bytes, and of 12 tilings only
    # 16 x 16 x 8 warps spilled at none of d = 200, 256, 1024, 1025, 2048, 2100 (hard, k = 10):
    # 80-126 registers, 2-3 programs per SM. (16 x 16 x 4 warps spilled 8 bytes at d = 1024;
    # BLOCK_D = 128 also passed but doubles the slices, each recomputing the S tile.)
    return 16, 16, bd, bk, 8


def _fwd_blocks(m: int, d: int, k: int):
    """Forward tiles: the forward streams D in chunks, so its tiles do not depend on D. With the
    runtime's alignment specialisation (sm_90) 32 x 64 x 8 warps, used before, spilled 48 bytes
    with soft weights; of 8 tilings 16 x 32 x 4 warps was the one with no spill at d = 128 and
    1025 (hard, k = 10, k = 1000) and the most programs per SM (4-5, 96-128 registers)."""
    bm, bn, bd, bk, warps = _blocks(m, d, k)
    if _INTERPRET:
        return bm, bn, bd, bk, warps
    return 16, 32, bd, bk, 4


def _positives(f, labels, soft):
    """(HARD, the labels' pointer, the soft weights' pointer, K): the kernel reads one of the two;
    the other pointer is f, never read."""
    if (labels is None) == (soft is None):
        raise ValueError("dps_fast: the SupCon ops need exactly one of labels and soft")
    if labels is not None:
        return True, labels.to(torch.int64).contiguous(), f, 1
    t = soft.float().contiguous()
    return False, f, t, t.shape[1]


def supcon_stats(f, labels, soft, inv_tau):
    """Per-row (logsumexp over j != i, positive weight sum, weighted similarity) of float32 rows
    f [M, d]; the host glue is dps_fast/ops/supcon.py."""
    hard, lab, t, k = _positives(f, labels, soft)
    m, d = f.shape
    fm, fn, fbd, bk, fwarps = _fwd_blocks(m, d, k)
    lse = torch.empty(m, dtype=torch.float32, device=f.device)
    wsum, wdot = torch.empty_like(lse), torch.empty_like(lse)
    _supcon_fwd_kernel[(triton.cdiv(m, fm),)](
        f, lab, t, lse, wsum, wdot, m, d, k, float(inv_tau), HARD=hard, BLOCK_M=fm, BLOCK_N=fn, BLOCK_D=fbd,
        BLOCK_K=bk, DCHUNK=_dchunk(fbd), num_warps=fwarps)
    return lse, wsum, wdot


def supcon_grad(f, labels, soft, lse, coef, invw, inv_tau):
    """d loss / d f from the logsumexp and the per-row coefficients."""
    hard, lab, t, k = _positives(f, labels, soft)
    m, d = f.shape
    df = torch.empty_like(f)
    bm, bn, bd, bk, warps = _blocks(m, d, k)
    grid = (triton.cdiv(m, bm), triton.cdiv(d, bd))
    _supcon_bwd_kernel[grid](f, lab, t, lse, coef, invw, df, m, d, k, float(inv_tau), HARD=hard, BLOCK_M=bm,
                             BLOCK_N=bn, BLOCK_D=bd, BLOCK_K=bk, DCHUNK=_dchunk(bd), SLICED=d > bd,
                             num_warps=warps)
    return df


# ---------------------------------------------------------------------------- ahead-of-time check
def aot_cases():
    """The configurations tools/triton_aot_check.py compiles for sm_90 (no GPU needed)."""
    def case(name, m, d, k, direction):
        return dict(name=name, m=m, d=d, k=k, direction=direction)
    return [case(f"supcon {dr} {kind} d={d}", m, d, k, dr)
            for (kind, m, d, k) in (("hard", 65536, 128, 1), ("soft k=10", 8192, 128, 10),
                                    ("soft k=1000", 8192, 128, 1000), ("hard", 8192, 256, 1))
            for dr in ("fwd", "bwd")] + \
        [case(f"supcon bwd {kind} d={d} (D slices)", 8192, d, k, "bwd")  # OutOfResources before
         for (kind, d, k) in (("hard", 1024, 1), ("hard", 1025, 1), ("hard", 2100, 1), ("soft k=10", 1025, 10))] + \
        [case("supcon fwd hard d=1025", 8192, 1025, 1, "fwd")]


def aot_signature(case):
    """(jit function, argument types, constexprs, launch config) of one AOT case."""
    hard, fwd = case["k"] == 1, case["direction"] == "fwd"
    bm, bn, bd, bk, warps = case.get("override") or (_fwd_blocks if fwd else _blocks)(case["m"], case["d"], case["k"])
    types = dict(F="*fp32", LAB="*i64" if hard else "*fp32", T="*fp32", M="i32", D="i32", K="i32", inv_tau="fp32",
                 LSE="*fp32")
    types.update(dict(WSUM="*fp32", WDOT="*fp32") if fwd else dict(COEF="*fp32", INVW="*fp32", DF="*fp32"))
    const = dict(HARD=hard, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_K=bk, DCHUNK=_dchunk(bd))
    if not fwd:
        const["SLICED"] = case["d"] > bd
    fn = _supcon_fwd_kernel if fwd else _supcon_bwd_kernel
    return fn, types, const, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps)

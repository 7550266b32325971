"""Triton kernels: flash-style SupCon / NT-Xent (docs/method.md §4), the O(M^2) parts.

The M x M similarity matrix is never materialised. The logsumexp kernel walks tiles
``[BLOCK_M, BLOCK_N]`` of ``S = F F^T / tau`` with an online logsumexp over ``j != i``;
the gradient kernel recomputes the tiles and forms the softmax part of
``dF_i = (1/tau) sum_j (G_ij + G_ji) F_j``, ``G_ij = c_i p_ij``, from the per-row logsumexp
(S is symmetric, so both terms come from the same tile). The positive term is linear in F
and computed in closed form by the host glue (dps_fast/ops/supcon.py). Memory: O(M d).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._rounding import to_dtype

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tensor cores at float32 accuracy: "tf32x3" splits each float32 operand into a TF32 head and
# tail and adds three TF32 products (head*head + head*tail + tail*head), about 2^-21 relative
# error a product against "ieee"'s 2^-24, but on the tensor cores (HMMA in the sm_90 SASS,
# `tools/triton_aot_check.py`) instead of FP32 FMAs: the review of issue 25 predicted the FMA
# kernels no faster than eager cuBLAS at M = 8192. Not yet timed on a GPU.
# (ROCm's Triton has no tf32x3: "ieee" there.)
DOT_PRECISION = tl.constexpr("ieee" if torch.version.hip else "tf32x3")


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
        s += tl.dot(_rows(F, ri, mi, d0 + dk, D), tl.trans(_rows(F, rj, mj, d0 + dk, D)), input_precision=DOT_PRECISION)
    return s


@triton.jit
def _supcon_lse_kernel(F, LSE, M, D, inv_tau, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, DCHUNK: tl.constexpr):
    pid = tl.program_id(0)
    ri = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mi = ri < M
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
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
    tl.store(LSE + ri, tl.where(l > 0, m + tl.log(l), 0.0), mask=mi)


@triton.jit
def _supcon_bwd_kernel(F, LSE, COEF, DF, M, D, inv_tau, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, DCHUNK: tl.constexpr):
    """The softmax part of dF for rows [BLOCK_M] and features [BLOCK_D] (program (i, k): slice k
    of the feature width, as the CUDA kernel's DSLICE). Each tile of S is formed over the whole
    width in DCHUNK steps: holding f_i [BLOCK_M, BLOCK_D] across the loop instead spilled at
    d = 128 and 256 with tf32x3 products (255 registers, sm_90, triton 3.6 and 3.8)."""
    pid = tl.program_id(0)
    ri = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mi = ri < M
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = (dd < D)[None, :]
    lse_i = tl.load(LSE + ri, mask=mi, other=0.0)
    c_i = tl.load(COEF + ri, mask=mi, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, M, BLOCK_N):
        rj = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mj = rj < M
        fj = _rows(F, rj, mj, dd, D)
        lse_j = tl.load(LSE + rj, mask=mj, other=0.0)
        c_j = tl.load(COEF + rj, mask=mj, other=0.0)
        s = _s_tile(F, ri, mi, rj, mj, D, BLOCK_M, BLOCK_N, DCHUNK) * inv_tau
        valid = mi[:, None] & mj[None, :] & (ri[:, None] != rj[None, :])
        g = tl.where(valid, c_i[:, None] * tl.exp(s - lse_i[:, None]) + c_j[None, :] * tl.exp(s - lse_j[None, :]),
                     0.0)
        acc += tl.dot(g, fj, input_precision=DOT_PRECISION)
    tl.store(DF + ri[:, None] * D + dd[None, :], to_dtype(acc * inv_tau, DF.dtype.element_ty), mask=mi[:, None] & dmask)


def _dchunk(block_d: int) -> int:
    """Features per step of an S-tile product over the whole width (_s_tile; in the interpreter
    one step per BLOCK_D)."""
    return block_d if _INTERPRET else min(32, block_d)


BWD_DMAX = 256  # features per backward program; see _blocks


def _blocks(m: int, d: int):
    """Backward tiles (BLOCK_M, BLOCK_N, BLOCK_D, warps). Sizes checked for spills by
    tools/triton_aot_check.py (sm_90)."""
    # BLOCK_D capped: at next_pow2(d) with no cap the backward needed 330 kB of shared memory
    # at d = 1024 and 657 kB at d = 1025 (sm_90 has 227 kB): OutOfResources for any d > 512.
    # Wider d runs ceil(d / BLOCK_D) slices. The interpreter keeps the same cap, so that the
    # tests run the sliced kernel as the GPU does.
    bd = max(16, min(triton.next_power_of_2(d), BWD_DMAX))
    if _INTERPRET:  # few, large programs
        bm = max(16, min(triton.next_power_of_2(m), 256))
        return bm, bm, bd, 4
    # Compiled for sm_90 with the runtime's alignment specialisation and tf32x3 products
    # (tools/triton_aot_check.py, triton 3.8 and 3.6, 2026-12-08), d = 128 / 256 / 1024 / 1025 /
    # 2100: 16 x 32 x 8 warps spilled at none (126-172 registers, 1-2 programs per SM); 32 x 32
    # x 8 reached 223-253 registers, 32 x 32 x 4 spilled up to 896 bytes.
    return 16, 32, bd, 8


def _fwd_blocks(m: int, d: int):
    """Logsumexp tiles: the kernel streams D in chunks, so its tiles do not depend on D. Compiled
    for sm_90 with the runtime's alignment specialisation at d = 128 / 256 / 1025
    (`tools/triton_aot_check.py`, 2026-12-08), with ieee products: 32 x 32 x 4 warps spilled 16
    bytes at d = 1025 on triton 3.6 (none on 3.8), 16 x 32 x 4 spilled 8 on 3.8; 32 x 16 x 4
    spilled on neither. With tf32x3 products, 32 x 16 x 4: 96-143 registers, 3-5 programs per
    SM, no spills on either."""
    bm, bn, bd, warps = _blocks(m, d)
    if _INTERPRET:
        return bm, bn, bd, warps
    return 32, 16, bd, 4


def supcon_lse(f, inv_tau):
    """Each row's logsumexp over j != i of <f_i, f_j> * inv_tau, float32 rows f [M, d]; the host
    glue is dps_fast/ops/supcon.py."""
    m, d = f.shape
    fm, fn, fbd, fwarps = _fwd_blocks(m, d)
    lse = torch.empty(m, dtype=torch.float32, device=f.device)
    _supcon_lse_kernel[(triton.cdiv(m, fm),)](f, lse, m, d, float(inv_tau), BLOCK_M=fm, BLOCK_N=fn, BLOCK_D=fbd,
                                              DCHUNK=_dchunk(fbd), num_warps=fwarps)
    return lse


def supcon_grad(f, lse, coef, inv_tau):
    """The softmax part of d loss / d f from the logsumexp and the per-row coefficients."""
    m, d = f.shape
    df = torch.empty_like(f)
    bm, bn, bd, warps = _blocks(m, d)
    grid = (triton.cdiv(m, bm), triton.cdiv(d, bd))
    _supcon_bwd_kernel[grid](f, lse, coef, df, m, d, float(inv_tau), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                             DCHUNK=_dchunk(bd), num_warps=warps)
    return df


# ---------------------------------------------------------------------------- ahead-of-time check
def aot_cases():
    """The configurations tools/triton_aot_check.py compiles for sm_90 (no GPU needed)."""
    def case(name, m, d, direction):
        return dict(name=name, m=m, d=d, direction=direction)
    return [case(f"supcon {dr} d={d}", m, d, dr) for (m, d) in ((65536, 128), (8192, 256)) for dr in ("fwd", "bwd")] + \
        [case(f"supcon bwd d={d} (D slices)", 8192, d, "bwd") for d in (1024, 1025, 2100)] + \
        [case("supcon fwd d=1025", 8192, 1025, "fwd")]


def aot_signature(case):
    """(jit function, argument types, constexprs, launch config) of one AOT case."""
    fwd = case["direction"] == "fwd"
    bm, bn, bd, warps = case.get("override") or (_fwd_blocks if fwd else _blocks)(case["m"], case["d"])
    types = dict(F="*fp32", M="i32", D="i32", inv_tau="fp32", LSE="*fp32")
    if not fwd:
        types.update(COEF="*fp32", DF="*fp32")
    const = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DCHUNK=_dchunk(bd))
    fn = _supcon_lse_kernel if fwd else _supcon_bwd_kernel
    return fn, types, const, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps)

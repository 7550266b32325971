"""Triton kernels: the fused DPS step (docs/method.md §2) and soft-target cross-entropy (docs/method.md §3).

One kernel family serves both ops (the soft-target CE is the DPS step with the target matrix in
place of the bank, no update and no discount). ``_plan`` picks one of three ways through a row
(docs/performance.md, "GPU kernels: bytes by design"):

- **resident** (a row's logits over all views fit in ``RESIDENT_MAX`` elements, C up to 8192 at
  V = 1): the logits (every view) and the bank row are loaded once, as one [ROWS, VP, BLOCK_C]
  tile, and everything (max, normalisers, evidence, update, target, gradient, loss) is computed
  from registers: one read of each input element, one write of each output element, one ``exp``
  per element and view (two with tau_e != 1), per-row reciprocals. C and the bank's row stride are
  compile-time constants here, so the compiler can prove 16-byte alignment of every row and issue
  128-bit accesses;
- **loop** (larger C, enough rows to fill the GPU): one program per row loops over column blocks
  of ``BLOCK_C``: pass 1 an online max / sum and the bank row's sum, pass 2 the update, target,
  gradient and loss (the logits read twice, the bank twice: 24 bytes per fp32 element);
- **split** (larger C, fewer than ``MIN_PROGRAMS`` rows): the columns are cut into chunks over a
  2-D grid: a stats kernel writes each chunk's (max, normalisers, bank sum, finiteness), an apply
  kernel combines them and writes its chunk's update and gradient, a third adds the loss. Three
  launches, no host synchronisation, the same bytes as the loop plus, per row and chunk, a record
  of 3 VP + 2 floats (read by each of the row's chunks) and VP floats of dot products.

Common to all: pass 1 counts the non-finite logits element by element (a running sum of the
logits would overflow for finite |z| near the float32 maximum, docs/method.md §9); the target's
row sum S needs no pass of its own (resident: the updated row's sum, in registers; loop and split:
the evidence sums to 1, so S = gamma * sum a + 1 from pass 1); the target is
``a / S`` and ``mass = 1`` when normalising (the DPS step, always), else the target is ``a``
itself and ``mass = S`` (PyTorch's soft-target cross-entropy for rows that do not sum to 1,
docs/method.md §3); the loss is ``mass * logsumexp - <target, z>`` in the overflow-safe half-gap
form; ``reduction="mean"/"sum"`` is finished in the last launch: every program writes its partial
sum, and the last one to finish (an atomic ticket) adds the partials in program order
(deterministic) and resets the ticket. No host synchronisation.

All offsets are int64. Rows with an out-of-range id or non-finite logits never touch the bank;
their loss and gradient are NaN.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._rounding import to_dtype

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The resident plan's limit: VP * next_pow2(C) elements of logits a row. At 8192 fp32 elements
# (32 KB of logits and 32 KB of bank a row) over 16 warps, a thread holds 16 elements of each
# live tile; the sm_90 compiles (tools/triton_aot_check.py) stay under 128 registers, the most
# a 512-thread program may use.
RESIDENT_MAX = 8192
# Below this many row programs, large C is split over a 2-D grid: 4 programs per SM of an H100
# (132 SMs), so that one wave covers the machine and a slow program does not leave it idle.
MIN_PROGRAMS = 4 * 132


class Plan(NamedTuple):
    """How one call is launched: ``kind`` (resident / loop / split), rows per program, column
    block, warps, and for split the column chunk and the number of chunks."""
    kind: str
    rows: int
    block_c: int
    warps: int
    chunk: int = 0
    chunks: int = 1


def _plan(b: int, c: int, v: int, interpret: bool = _INTERPRET) -> Plan:
    vp = triton.next_power_of_2(v)
    block = triton.next_power_of_2(max(c, 16))
    if block * vp <= RESIDENT_MAX:
        # a tile of about 2048 elements (one row when it is longer) at 8 per thread: the interpreter
        # instead takes few, large programs (it costs milliseconds per program)
        per_program = 65536 if interpret else 2048
        rows = max(1, min(triton.next_power_of_2(max(b, 1)), per_program // (block * vp)))
        return Plan("resident", rows, block, max(4, min(16, rows * block * vp // 256)))
    if interpret:
        return Plan("loop", 1, min(block, 32768), 4)
    # A tile of at most 2048 (V=1: 4096 for one wide row) fp32 elements, spread at about 8 per
    # thread: `tools/triton_aot_check.py` (ptxas -v, sm_90) showed 16-32 per thread spilling
    # registers (up to 1.6 kB per thread at 32 rows x 128 columns, 4 warps).
    block_c = min(block, 4096 if v == 1 else 2048)
    warps = max(4, min(16, block_c // 256))
    chunks = min(triton.cdiv(MIN_PROGRAMS, max(b, 1)), triton.cdiv(c, block_c))
    if chunks <= 1:
        return Plan("loop", 1, block_c, warps)
    return _split(c, block_c, warps, chunks)


def _split(c: int, block_c: int, warps: int, chunks: int) -> Plan:
    """A split plan of about ``chunks`` chunks, each a whole number of column blocks."""
    chunk = triton.cdiv(triton.cdiv(c, chunks), block_c) * block_c
    return Plan("split", 1, block_c, warps, chunk, triton.cdiv(c, chunk))


# ------------------------------------------------------------------------- shared pieces
@triton.jit
def _row_ids(IDX, rows, rmask, N, HAS_IDX: tl.constexpr):
    """Each row's bank id (the row itself for a target matrix) and whether it is in the bank."""
    ids = tl.load(IDX + rows, mask=rmask, other=0).to(tl.int64) if HAS_IDX else rows
    return ids, rmask & (ids >= 0) & (ids < N)


@triton.jit
def _target_scale(S, ok, NORMALIZE: tl.constexpr):
    """(the target's scale, its mass): a / S of mass 1 (the DPS step) or a itself, of mass S.
    (The mass is returned as S either way, one return type; with NORMALIZE it is never read.)"""
    if NORMALIZE:
        scale = tl.where(ok, 1.0 / tl.where(ok, S, 1.0), 0.0)
    else:
        scale = tl.where(ok, 1.0, 0.0)
    return scale, S


@triton.jit
def _row_loss(s_all, dots, ok, mass, NORMALIZE: tl.constexpr):
    """mass * logsumexp - <t, z> per row and view = mass * log(s) + 2 * the half gap."""
    log_s = tl.log(tl.where(s_all > 0, s_all, 1.0))
    if not NORMALIZE:
        log_s = mass[:, None] * log_s
    return tl.where(ok[:, None], log_s + 2.0 * dots, float("nan"))


@triton.jit
def _write_loss(LOSS, PART, TICKET, loss, rows, rmask, vcol, B, out_scale, V: tl.constexpr, REDUCE: tl.constexpr,
                BLOCK_P: tl.constexpr):
    """The loss per view and row (reduction none), or this program's partial sum; the last
    program to finish (an atomic ticket) adds the partials in program order and resets it."""
    vmask = vcol[None, :] < V
    if REDUCE == 0:
        loff = vcol[None, :].to(tl.int64) * B + rows[:, None]
        tl.store(LOSS + loff, loss, mask=rmask[:, None] & vmask)
    else:
        pid = tl.program_id(0)
        part = tl.sum(tl.sum(tl.where(rmask[:, None] & vmask, loss, 0.0), 1), 0)
        tl.store(PART + pid, part)
        ticket = tl.atomic_add(TICKET, 1)
        nprog = tl.num_programs(0)
        if ticket == nprog - 1:
            total = tl.zeros([BLOCK_P], dtype=tl.float32)
            for p0 in range(0, nprog, BLOCK_P):
                pp = p0 + tl.arange(0, BLOCK_P)
                total += tl.load(PART + pp, mask=pp < nprog, other=0.0, volatile=True)
            tl.store(LOSS, tl.sum(total, 0) * out_scale)
            tl.atomic_xchg(TICKET, 0)


# ------------------------------------------------------------------------- resident: one read
@triton.jit
def _dps_ce_resident_kernel(
    Z, IDX, A, G, LOSS, PART, TICKET,
    B, N, gamma, inv_tau_e, gscale, out_scale,
    C: tl.constexpr, STRIDE_A: tl.constexpr,
    V: tl.constexpr, VP: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    POSTERIOR: tl.constexpr, UPDATE: tl.constexpr, TEMPER: tl.constexpr, HAS_GRAD: tl.constexpr,
    REDUCE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_IDX: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The resident plan: ROWS whole rows, every view, as one tile; each input element read once."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rmask = rows < B
    ids, ok = _row_ids(IDX, rows, rmask, N, HAS_IDX)
    vcol = tl.arange(0, VP)
    cc = tl.arange(0, BLOCK_C)
    cmask = cc < C
    # the row's logits, every view, in one load: [ROWS, VP, BLOCK_C] (masked lanes -inf: exp gives 0)
    zmsk = rmask[:, None, None] & (vcol < V)[None, :, None] & cmask[None, None, :]
    zoff = (vcol[None, :, None].to(tl.int64) * B + rows[:, None, None]) * C + cc[None, None, :]
    z = tl.load(Z + zoff, mask=zmsk, other=float("-inf")).to(tl.float32)
    n_bad = tl.sum(tl.sum(tl.where(zmsk & ~(tl.abs(z) < float("inf")), 1, 0), 2), 1)
    ok = ok & (n_bad == 0)  # finite logits give a finite normaliser (at most C)
    m = tl.max(z, 2)
    m = tl.where(tl.abs(m) < float("inf"), m, 0.0)  # padded views; NaN / inf rows are refused already
    ez = tl.exp(z - m[:, :, None])
    s = tl.sum(ez, 2)
    inv_s = tl.where(s > 0, 1.0 / s, 0.0)
    # the bank row, once
    amsk = ok[:, None] & cmask[None, :]
    aoff = ids[:, None] * STRIDE_A + cc[None, :]
    a = tl.load(A + aoff, mask=amsk, other=0.0).to(tl.float32)
    if POSTERIOR or UPDATE:
        if TEMPER:
            et = tl.exp((z - m[:, :, None]) * inv_tau_e)
            se = tl.sum(et, 2)
            evidence = tl.sum(et * tl.where(se > 0, 1.0 / se, 0.0)[:, :, None], 1) * (1.0 / V)
        else:  # tau_e = 1: the softmax itself, no second exp
            evidence = tl.sum(ez * inv_s[:, :, None], 1) * (1.0 / V)
        a_new = tl.where(amsk, gamma * a + evidence, 0.0)
        if UPDATE:
            tl.store(A + aoff, to_dtype(a_new, A.dtype.element_ty), mask=amsk)
        if POSTERIOR:
            a = a_new
    target_scale, mass = _target_scale(tl.sum(a, 1), ok, NORMALIZE)
    t = (a * target_scale[:, None])[:, None, :]
    # the half gap sum_j t_j (m/2 - z_j/2) >= 0: m/2 - z/2 cannot overflow for finite z, so the
    # loss overflows only where the exact loss does (docs/method.md §9)
    dots = tl.sum(tl.where(zmsk, t * (0.5 * m[:, :, None] - 0.5 * z), 0.0), 2)
    if HAS_GRAD:
        p = ez * inv_s[:, :, None]
        if NORMALIZE:
            g = (p - t) * gscale
        else:
            g = (mass[:, None, None] * p - t) * gscale
        g = tl.where(ok[:, None, None], g, float("nan"))
        tl.store(G + zoff, to_dtype(g, G.dtype.element_ty), mask=zmsk)
    loss = _row_loss(s, dots, ok, mass, NORMALIZE)
    _write_loss(LOSS, PART, TICKET, loss, rows, rmask, vcol, B, out_scale, V, REDUCE, BLOCK_P)


# ------------------------------------------------------------------------- loop and split: column blocks
@triton.jit
def _evidence(Z, rows, cc, msk, m_all, se_all, vcol, B, C, inv_tau_e, V: tl.constexpr, ROWS: tl.constexpr,
              BLOCK_C: tl.constexpr):
    """mean over views of softmax(z_v / tau_e) for one column block."""
    e = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    for v in tl.static_range(V):
        sel = vcol[None, :] == v
        mv = tl.sum(tl.where(sel, m_all, 0.0), 1)
        sev = tl.sum(tl.where(sel, se_all, 0.0), 1)
        z = tl.load(Z + ((v * B + rows) * C)[:, None] + cc[None, :], mask=msk, other=0.0)
        e += tl.exp((z.to(tl.float32) - mv[:, None]) * inv_tau_e) / sev[:, None]
    return e / V


@triton.jit
def _view_stats(Z, A, rows, rmask, ids, ok, a_acc, cols, B, C, c_lo, c_hi, stride_a, inv_tau_e, v: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_C: tl.constexpr, TEMPER: tl.constexpr):
    """Pass 1 over columns [c_lo, c_hi) for view v: online max m, softmax normaliser s (and se of
    the tempered one), whether every logit is finite; with view 0, the bank row accumulated into
    a_acc by column (a per-trip tl.sum here crashed triton 3.8's TritonGPUOptimizeThreadLocality
    pass, sm_90, for the unnormalised soft CE)."""
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], dtype=tl.float32)
    se = tl.zeros([ROWS], dtype=tl.float32)
    n_bad = tl.zeros([ROWS], dtype=tl.int32)
    base = (v * B + rows) * C
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cc = c0 + cols
        msk = rmask[:, None] & (cc < c_hi)[None, :]
        z = tl.load(Z + base[:, None] + cc[None, :], mask=msk, other=0.0).to(tl.float32)
        if v == 0:  # the bank row, read in the same column loop as the logits
            amsk = ok[:, None] & (cc < c_hi)[None, :]
            a_acc += tl.load(A + ids[:, None] * stride_a + cc[None, :], mask=amsk, other=0.0).to(tl.float32)
        zm = tl.where(msk, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.where(msk, tl.exp(z - m_safe[:, None]), 0.0), 1)
        if TEMPER:
            se = se * tl.exp((m - m_safe) * inv_tau_e) + tl.sum(
                tl.where(msk, tl.exp((z - m_safe[:, None]) * inv_tau_e), 0.0), 1)
        # |z| < inf is false exactly for NaN and +-inf: never an overflow of finite values
        n_bad += tl.sum(tl.where(msk & ~(tl.abs(z) < float("inf")), 1, 0), 1)
        m = m_new
    if not TEMPER:
        se = s
    return m, s, se, (n_bad == 0) & (s == s) & (s < float("inf")), a_acc


@triton.jit
def _all_view_stats(Z, A, rows, rmask, ids, ok, cols, B, C, c_lo, c_hi, stride_a, inv_tau_e, V: tl.constexpr,
                    VP: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, TEMPER: tl.constexpr):
    """Pass 1 for every view: [ROWS, VP] of m, s, se; ok and the bank row's sum over the columns."""
    m_all = tl.zeros([ROWS, VP], dtype=tl.float32)
    s_all = tl.zeros([ROWS, VP], dtype=tl.float32)
    se_all = tl.zeros([ROWS, VP], dtype=tl.float32)
    a_acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    vcol = tl.arange(0, VP)
    for v in tl.static_range(V):
        m, s, se, finite, a_acc = _view_stats(Z, A, rows, rmask, ids, ok, a_acc, cols, B, C, c_lo, c_hi, stride_a,
                                              inv_tau_e, v, ROWS, BLOCK_C, TEMPER)
        ok = ok & finite
        sel = vcol[None, :] == v
        m_all = tl.where(sel, m[:, None], m_all)
        s_all = tl.where(sel, s[:, None], s_all)
        se_all = tl.where(sel, se[:, None], se_all)
    return m_all, s_all, se_all, ok, tl.sum(a_acc, 1)


@triton.jit
def _view_outputs(Z, G, rows, rmask, amsk, cmask, cc, t, m_all, s_all, vcol, ok, mass, dots, B, C, gscale,
                  V: tl.constexpr, HAS_GRAD: tl.constexpr, NORMALIZE: tl.constexpr):
    """Pass 2 for one column block, every view: the half-gap dot products (added to dots) and
    the gradient (mass * softmax - t) * gscale."""
    for v in tl.static_range(V):
        sel = vcol[None, :] == v
        mv = tl.sum(tl.where(sel, m_all, 0.0), 1)
        sv = tl.sum(tl.where(sel, s_all, 0.0), 1)
        zmsk = rmask[:, None] & cmask
        zoff = ((v * B + rows) * C)[:, None] + cc[None, :]
        z = tl.load(Z + zoff, mask=zmsk, other=0.0).to(tl.float32)
        # the half gap sum_j t_j (m/2 - z_j/2) >= 0: m/2 - z/2 cannot overflow for finite z, so
        # the loss overflows only where the exact loss does (docs/method.md §9)
        d = tl.sum(tl.where(amsk, t * (0.5 * mv[:, None] - 0.5 * z), 0.0), 1)
        dots = tl.where(sel, dots + d[:, None], dots)
        if HAS_GRAD:
            p = tl.exp(z - mv[:, None]) / sv[:, None]
            if NORMALIZE:
                g = tl.where(ok[:, None], (p - t) * gscale, float("nan"))
            else:
                g = tl.where(ok[:, None], (mass[:, None] * p - t) * gscale, float("nan"))
            tl.store(G + zoff, to_dtype(g, G.dtype.element_ty), mask=zmsk)
    return dots


@triton.jit
def _apply_columns(Z, A, G, rows, rmask, ids, ok, cols, c_lo, c_hi, B, C, stride_a, gamma, inv_tau_e, gscale,
                   m_all, s_all, se_all, target_scale, mass, V: tl.constexpr, VP: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK_C: tl.constexpr, POSTERIOR: tl.constexpr, UPDATE: tl.constexpr,
                   HAS_GRAD: tl.constexpr, NORMALIZE: tl.constexpr):
    """Pass 2 over columns [c_lo, c_hi): bank store, target, gradient; returns the half-gap dots."""
    vcol = tl.arange(0, VP)
    dots = tl.zeros([ROWS, VP], dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cc = c0 + cols
        cmask = (cc < c_hi)[None, :]
        amsk = ok[:, None] & cmask
        a = tl.load(A + ids[:, None] * stride_a + cc[None, :], mask=amsk, other=0.0).to(tl.float32)
        if POSTERIOR or UPDATE:
            a_new = gamma * a + _evidence(Z, rows, cc, amsk, m_all, se_all, vcol, B, C, inv_tau_e, V, ROWS, BLOCK_C)
            if UPDATE:
                tl.store(A + ids[:, None] * stride_a + cc[None, :], to_dtype(a_new, A.dtype.element_ty), mask=amsk)
            if POSTERIOR:
                a = a_new
        t = a * target_scale[:, None]
        dots = _view_outputs(Z, G, rows, rmask, amsk, cmask, cc, t, m_all, s_all, vcol, ok, mass, dots, B, C,
                             gscale, V, HAS_GRAD, NORMALIZE)
    return dots


@triton.jit
def _dps_ce_kernel(
    Z, IDX, A, G, LOSS, PART, TICKET,
    B, C, N, stride_a, gamma, inv_tau_e, gscale, out_scale,
    V: tl.constexpr, VP: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    POSTERIOR: tl.constexpr, UPDATE: tl.constexpr, TEMPER: tl.constexpr, HAS_GRAD: tl.constexpr,
    REDUCE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_IDX: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The loop plan: whole rows, two passes over column blocks."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rmask = rows < B
    cols = tl.arange(0, BLOCK_C)
    ids, ok = _row_ids(IDX, rows, rmask, N, HAS_IDX)
    m_all, s_all, se_all, ok, a_sum = _all_view_stats(Z, A, rows, rmask, ids, ok, cols, B, C, 0, C, stride_a,
                                                      inv_tau_e, V, VP, ROWS, BLOCK_C, TEMPER)
    # the target's row sum S, from pass 1 (no pass of its own): the evidence, a mean of
    # softmaxes, sums to 1, so the updated row sums to gamma * sum_j a_j + 1 (docs/method.md §2)
    target_scale, mass = _target_scale(gamma * a_sum + 1.0 if POSTERIOR else a_sum, ok, NORMALIZE)
    dots = _apply_columns(Z, A, G, rows, rmask, ids, ok, cols, 0, C, B, C, stride_a, gamma, inv_tau_e, gscale,
                          m_all, s_all, se_all, target_scale, mass, V, VP, ROWS, BLOCK_C, POSTERIOR, UPDATE,
                          HAS_GRAD, NORMALIZE)
    loss = _row_loss(s_all, dots, ok, mass, NORMALIZE)
    _write_loss(LOSS, PART, TICKET, loss, rows, rmask, tl.arange(0, VP), B, out_scale, V, REDUCE, BLOCK_P)


# ------------------------------------------------------------------------- split: a 2-D grid over chunks
@triton.jit
def _combine(WS, rows, rmask, NCH, inv_tau_e, VP: tl.constexpr, NCHP: tl.constexpr, ROWS: tl.constexpr,
             TEMPER: tl.constexpr):
    """Every chunk's pass-1 statistics of these rows, combined: [ROWS, VP] of m, s, se; ok and
    the bank row's sum. A (row, chunk) record is m[VP], s[VP], se[VP], bank sum, finite."""
    chs = tl.arange(0, NCHP)
    cm = rmask[:, None] & (chs < NCH)[None, :]
    base = (rows[:, None] * NCH + chs[None, :]) * (3 * VP + 2)
    ok = tl.min(tl.load(WS + base + 3 * VP + 1, mask=cm, other=1.0), 1) > 0.5
    a_sum = tl.sum(tl.load(WS + base + 3 * VP, mask=cm, other=0.0), 1)
    vcol = tl.arange(0, VP)
    m_all = tl.zeros([ROWS, VP], dtype=tl.float32)
    s_all = tl.zeros([ROWS, VP], dtype=tl.float32)
    se_all = tl.zeros([ROWS, VP], dtype=tl.float32)
    for v in tl.static_range(VP):
        mc = tl.load(WS + base + v, mask=cm, other=float("-inf"))
        mv = tl.max(mc, 1)
        mv = tl.where(tl.abs(mv) < float("inf"), mv, 0.0)  # padded views; refused rows
        sv = tl.sum(tl.load(WS + base + VP + v, mask=cm, other=0.0) * tl.exp(mc - mv[:, None]), 1)
        sev = sv
        if TEMPER:
            sev = tl.sum(tl.load(WS + base + 2 * VP + v, mask=cm, other=0.0) * tl.exp((mc - mv[:, None]) * inv_tau_e),
                         1)
        sel = vcol[None, :] == v
        m_all = tl.where(sel, mv[:, None], m_all)
        s_all = tl.where(sel, sv[:, None], s_all)
        se_all = tl.where(sel, sev[:, None], se_all)
    return m_all, s_all, se_all, ok, a_sum


@triton.jit
def _split_stats_kernel(Z, IDX, A, WS, B, C, N, stride_a, inv_tau_e, CHUNK, NCH,
                        V: tl.constexpr, VP: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                        TEMPER: tl.constexpr, HAS_IDX: tl.constexpr):
    """Split plan, launch 1 of 3: pass 1 over one chunk of columns, its record written."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rmask = rows < B
    ch = tl.program_id(1)
    c_lo = ch * CHUNK
    ids, ok = _row_ids(IDX, rows, rmask, N, HAS_IDX)
    m_all, s_all, se_all, ok, a_sum = _all_view_stats(Z, A, rows, rmask, ids, ok, tl.arange(0, BLOCK_C), B, C, c_lo,
                                                      tl.minimum(c_lo + CHUNK, C), stride_a, inv_tau_e, V, VP, ROWS,
                                                      BLOCK_C, TEMPER)
    base = (rows * NCH + ch) * (3 * VP + 2)
    vcol = tl.arange(0, VP)
    tl.store(WS + base[:, None] + vcol[None, :], m_all, mask=rmask[:, None])
    tl.store(WS + base[:, None] + VP + vcol[None, :], s_all, mask=rmask[:, None])
    tl.store(WS + base[:, None] + 2 * VP + vcol[None, :], se_all, mask=rmask[:, None])
    tl.store(WS + base + 3 * VP, a_sum, mask=rmask)
    tl.store(WS + base + 3 * VP + 1, tl.where(ok, 1.0, 0.0), mask=rmask)


@triton.jit
def _split_apply_kernel(Z, IDX, A, G, WS, DOTS, B, C, N, stride_a, gamma, inv_tau_e, gscale, CHUNK, NCH,
                        V: tl.constexpr, VP: tl.constexpr, NCHP: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK_C: tl.constexpr, POSTERIOR: tl.constexpr, UPDATE: tl.constexpr, TEMPER: tl.constexpr,
                        HAS_GRAD: tl.constexpr, NORMALIZE: tl.constexpr, HAS_IDX: tl.constexpr):
    """Split plan, launch 2 of 3: the rows' statistics combined, then pass 2 over one chunk."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rmask = rows < B
    ch = tl.program_id(1)
    c_lo = ch * CHUNK
    ids, ok = _row_ids(IDX, rows, rmask, N, HAS_IDX)
    m_all, s_all, se_all, ok_all, a_sum = _combine(WS, rows, rmask, NCH, inv_tau_e, VP, NCHP, ROWS, TEMPER)
    ok = ok & ok_all
    target_scale, mass = _target_scale(gamma * a_sum + 1.0 if POSTERIOR else a_sum, ok, NORMALIZE)
    dots = _apply_columns(Z, A, G, rows, rmask, ids, ok, tl.arange(0, BLOCK_C), c_lo, tl.minimum(c_lo + CHUNK, C),
                          B, C, stride_a, gamma, inv_tau_e, gscale, m_all, s_all, se_all, target_scale, mass, V, VP,
                          ROWS, BLOCK_C, POSTERIOR, UPDATE, HAS_GRAD, NORMALIZE)
    vcol = tl.arange(0, VP)
    tl.store(DOTS + ((rows * NCH + ch) * VP)[:, None] + vcol[None, :], dots, mask=rmask[:, None])


@triton.jit
def _split_loss_kernel(IDX, WS, DOTS, LOSS, PART, TICKET, B, N, gamma, out_scale, NCH,
                       V: tl.constexpr, VP: tl.constexpr, NCHP: tl.constexpr, ROWS: tl.constexpr,
                       POSTERIOR: tl.constexpr, REDUCE: tl.constexpr, NORMALIZE: tl.constexpr,
                       HAS_IDX: tl.constexpr, BLOCK_P: tl.constexpr):
    """Split plan, launch 3 of 3: each row's loss from its chunks' dots (in chunk order) and the reduction."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rmask = rows < B
    ids, ok = _row_ids(IDX, rows, rmask, N, HAS_IDX)
    m_all, s_all, se_all, ok_all, a_sum = _combine(WS, rows, rmask, NCH, 1.0, VP, NCHP, ROWS, False)
    ok = ok & ok_all
    target_scale, mass = _target_scale(gamma * a_sum + 1.0 if POSTERIOR else a_sum, ok, NORMALIZE)
    chs = tl.arange(0, NCHP)
    cm = rmask[:, None] & (chs < NCH)[None, :]
    vcol = tl.arange(0, VP)
    dots = tl.zeros([ROWS, VP], dtype=tl.float32)
    for v in tl.static_range(VP):
        d = tl.sum(tl.load(DOTS + (rows[:, None] * NCH + chs[None, :]) * VP + v, mask=cm, other=0.0), 1)
        dots = tl.where(vcol[None, :] == v, d[:, None], dots)
    loss = _row_loss(s_all, dots, ok, mass, NORMALIZE)
    _write_loss(LOSS, PART, TICKET, loss, rows, rmask, vcol, B, out_scale, V, REDUCE, BLOCK_P)


# ------------------------------------------------------------------------- launchers
_tickets: dict = {}


def _ticket(device: torch.device) -> torch.Tensor:
    """A per-device int32 counter, always left at 0 by the kernel that used it.
    (Concurrent launches of these kernels on several streams of one device would
    share it: run them on one stream.)"""
    key = (device.type, device.index)
    t = _tickets.get(key)
    if t is None:
        t = _tickets[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


# The constexprs (of _flags) that the split plan's stats and loss launches take.
_STATS_FLAGS = ("V", "VP", "ROWS", "TEMPER", "HAS_IDX")
_LOSS_FLAGS = ("V", "VP", "ROWS", "POSTERIOR", "NORMALIZE", "HAS_IDX")


def _subset(flags, names):
    return {k: flags[k] for k in names}


def _flags(v, plan, posterior, update, tau_e, has_grad, normalize, has_idx):
    """The constexprs every plan's kernels share."""
    return dict(V=v, VP=triton.next_power_of_2(v), ROWS=plan.rows, POSTERIOR=bool(posterior), UPDATE=bool(update),
                TEMPER=float(tau_e) != 1.0, HAS_GRAD=has_grad, NORMALIZE=bool(normalize), HAS_IDX=has_idx)


def _launch(z, idx, a, grad, gamma, tau_e, posterior, update, reduction, normalize, plan=None):
    v = z.shape[0] if z.dim() == 3 else 1
    b, c = z.shape[-2], z.shape[-1]
    z = z.contiguous()
    has_grad = grad.numel() > 0
    if has_grad and not grad.is_contiguous():
        raise ValueError("dps_fast: grad buffer must be contiguous")
    if a.dim() != 2 or (a.shape[1] > 1 and a.stride(1) != 1):
        raise ValueError("dps_fast: bank/target must be [N, C] with unit class stride")
    plan = plan or _plan(b, c, v)
    dev = z.device
    loss = torch.empty(z.shape[:-1] if reduction == 0 else (), dtype=torch.float32, device=dev)
    nprog = triton.cdiv(b, plan.rows)
    part = torch.empty(nprog, dtype=torch.float32, device=dev)
    out_scale = 1.0 / (v * b) if reduction == 1 else 1.0
    gscale = out_scale if reduction == 1 else 1.0
    flags = _flags(v, plan, posterior, update, tau_e, has_grad, normalize, idx is not None)
    ptrs = (z, idx if idx is not None else z, a)
    g = grad if has_grad else z
    out = dict(REDUCE=int(reduction), BLOCK_P=min(1024, triton.next_power_of_2(nprog)))
    if plan.kind == "resident":
        _dps_ce_resident_kernel[(nprog,)](
            *ptrs, g, loss, part, _ticket(dev), b, a.shape[0], float(gamma), 1.0 / float(tau_e), gscale, out_scale,
            C=c, STRIDE_A=a.stride(0), BLOCK_C=plan.block_c, **flags, **out, num_warps=plan.warps)
    elif plan.kind == "loop":
        _dps_ce_kernel[(nprog,)](
            *ptrs, g, loss, part, _ticket(dev), b, c, a.shape[0], a.stride(0), float(gamma), 1.0 / float(tau_e),
            gscale, out_scale, BLOCK_C=plan.block_c, **flags, **out, num_warps=plan.warps)
    elif plan.kind == "split":
        _launch_split(ptrs, g, loss, part, b, c, a, gamma, tau_e, gscale, out_scale, plan, flags, out)
    else:
        raise ValueError(f"dps_fast: unknown launch plan {plan.kind!r}")
    return loss


def _launch_split(ptrs, g, loss, part, b, c, a, gamma, tau_e, gscale, out_scale, plan, flags, out):
    """The split plan's three launches, in stream order (no host synchronisation)."""
    dev, vp, nch = g.device, flags["VP"], plan.chunks
    ws = torch.empty((b, nch, 3 * vp + 2), dtype=torch.float32, device=dev)
    dots = torch.empty((b, nch, vp), dtype=torch.float32, device=dev)
    grid = (triton.cdiv(b, plan.rows), nch)
    _split_stats_kernel[grid](*ptrs, ws, b, c, a.shape[0], a.stride(0), 1.0 / float(tau_e), plan.chunk, nch,
                              BLOCK_C=plan.block_c, **_subset(flags, _STATS_FLAGS), num_warps=plan.warps)
    nchp = triton.next_power_of_2(nch)
    _split_apply_kernel[grid](*ptrs, g, ws, dots, b, c, a.shape[0], a.stride(0), float(gamma), 1.0 / float(tau_e),
                              gscale, plan.chunk, nch, NCHP=nchp, BLOCK_C=plan.block_c, **flags,
                              num_warps=plan.warps)
    _split_loss_kernel[(grid[0],)](ptrs[1], ws, dots, loss, part, _ticket(dev), b, a.shape[0], float(gamma), out_scale,
                                   nch, NCHP=nchp, **_subset(flags, _LOSS_FLAGS), **out, num_warps=4)


def dps_ce_fwd(logits, index, alpha, grad, gamma, tau_e, posterior, update, reduction):
    if update and logits.shape[-2] > 0:
        # the bank is written in place, behind autograd's back: bump its version as an in-place
        # op does (csrc/cpu/dps_cross_entropy.cpp::dps_ce_fwd_cpu; skips inference tensors)
        torch.autograd.graph.increment_version(alpha)
    idx = index if index.dtype in (torch.int32, torch.int64) else index.to(torch.int64)
    return _launch(logits, idx.contiguous(), alpha, grad, gamma, tau_e, posterior, update, reduction, True)


def soft_ce_fwd(logits, target, grad, normalize, reduction):
    t = target.contiguous()
    return _launch(logits, None, t, grad, 0.0, 1.0, False, False, reduction, normalize)


# ---------------------------------------------------------------------------- ahead-of-time check
def aot_cases():
    """The configurations tools/triton_aot_check.py compiles for sm_90 (no GPU needed): the
    benchmark shapes with the plan the GPU launcher picks; a split shape once per launch."""
    def case(name, b, c, v, z="fp32", bank="fp32", idx="i64", reduction=1, posterior=True, update=True,
             temper=False, grad=True, soft=False, normalize=True, launch=None):
        return dict(name=name, shape=[v, b, c], z=z, bank=bank, idx=idx, reduction=reduction, posterior=posterior,
                    update=update, temper=temper, grad=grad, soft=soft, normalize=normalize, launch=launch)

    def split(name, b, c, v, **kw):
        return [case(f"{name} [{k}]", b, c, v, launch=k, **kw) for k in ("stats", "apply", "loss")]
    return [
        case("dps 256x100 fp32/fp32 mean", 256, 100, 1),
        case("dps 1024x1000 bf16/bf16 mean", 1024, 1000, 1, z="bf16", bank="bf16"),
        case("dps 65536x1000 bf16/fp32 sum i32-index", 65536, 1000, 1, z="bf16", idx="i32", reduction=2),
        case("dps 65536x8192 fp32/fp32 mean", 65536, 8192, 1),
        case("dps 65536x8193 fp32/fp32 mean", 65536, 8193, 1),
        case("dps 8192x32000 fp32/fp32 none", 8192, 32000, 1, reduction=0),
        case("dps 8192x32000 fp16/bf16 mean", 8192, 32000, 1, z="fp16", bank="bf16"),
        case("dps 2 views 1024x1000 tau_e fp32 mean", 1024, 1000, 2, temper=True),
        case("dps 2 views 65536x4096 tau_e bf16 mean", 65536, 4096, 2, z="bf16", temper=True),
        case("dps 2 views 4096x32000 bf16 no-grad", 4096, 32000, 2, z="bf16", grad=False),
        case("dps update-only 4096x10", 4096, 10, 1, posterior=False),
        case("soft-ce 4096x1000 fp32", 4096, 1000, 1, soft=True),
        case("soft-ce 4096x1000 fp32 unnormalised", 4096, 1000, 1, soft=True, normalize=False),
        case("soft-ce 4096x131072 bf16", 4096, 131072, 1, z="bf16", bank="bf16", soft=True),
        *split("dps split 256x32000 fp32 mean", 256, 32000, 1),
        *split("dps split 2 views 64x131072 bf16 tau_e sum", 64, 131072, 2, z="bf16", temper=True, reduction=2),
    ]


def aot_signature(case):
    """(jit function, argument types, constexprs, launch config) of one AOT case; the launch
    config's ``ints`` are the integer arguments' values (for the divisibility specialisation)."""
    v, b, c = case["shape"]
    plan = _plan(b, c, v, interpret=False)
    z, bank, soft = case["z"], case["bank"], case["soft"]
    flags = _flags(v, plan, case["posterior"] and not soft, case["update"] and not soft, 2.0 if case["temper"] else 1.0,
                   case["grad"], case["normalize"] or not soft, not soft)
    nprog = triton.cdiv(b, plan.rows)
    out = dict(REDUCE=case["reduction"], BLOCK_P=min(1024, triton.next_power_of_2(nprog)))
    types = dict(Z=f"*{z}", IDX=f"*{case['idx']}" if not soft else f"*{z}", A=f"*{bank}", G=f"*{z}",
                 LOSS="*fp32", PART="*fp32", TICKET="*i32", WS="*fp32", DOTS="*fp32", B="i32", C="i32", N="i32",
                 stride_a="i64", gamma="fp32", inv_tau_e="fp32", gscale="fp32", out_scale="fp32", CHUNK="i32",
                 NCH="i32")
    cfg = dict(plan=plan.kind, ROWS=plan.rows, BLOCK_C=plan.block_c, num_warps=plan.warps,
               ints=dict(B=b, C=c, stride_a=c, CHUNK=plan.chunk, NCH=plan.chunks))
    if plan.kind == "resident":  # C is a constexpr there
        types.pop("C")
        return _dps_ce_resident_kernel, types, dict(C=c, STRIDE_A=c, BLOCK_C=plan.block_c, **flags, **out), cfg
    if plan.kind == "loop":
        return _dps_ce_kernel, types, dict(BLOCK_C=plan.block_c, **flags, **out), cfg
    nchp = triton.next_power_of_2(plan.chunks)
    launch = case.get("launch") or "apply"
    cfg.update(plan=f"split/{launch}", CHUNK=plan.chunk, NCH=plan.chunks)
    if launch == "stats":
        return _split_stats_kernel, types, dict(BLOCK_C=plan.block_c, **_subset(flags, _STATS_FLAGS)), cfg
    if launch == "apply":
        return _split_apply_kernel, types, dict(NCHP=nchp, BLOCK_C=plan.block_c, **flags), cfg
    cfg["num_warps"] = 4
    return _split_loss_kernel, types, dict(NCHP=nchp, **_subset(flags, _LOSS_FLAGS), **out), cfg

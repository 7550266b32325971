"""Triton kernels: the fused DPS step (docs/method.md §2) and soft-target cross-entropy (docs/method.md §3).

One kernel serves both ops (the soft-target CE is the DPS step with the target
matrix in place of the bank, no update and no discount). One launch per call:

- the grid packs ``ROWS`` samples per program (small C is launch-bound otherwise);
- each program loops over column blocks of ``BLOCK_C`` with an online max / sum,
  so any C works (up to and beyond 128k classes) in float32 arithmetic;
- pass 1 also counts the non-finite logits element by element (a running sum of the
  logits would overflow for finite |z| near the float32 maximum, docs/method.md §9);
- pass 1 also sums the bank row, which gives the target's row sum S without a pass of
  its own (the evidence sums to 1: S = gamma * sum a + 1); pass 2 recomputes the softmax,
  stores the updated bank row, the gradient ``(mass * softmax - target) * scale`` and the loss
  ``mass * logsumexp - <target, z>``: the target is ``a / S`` and ``mass = 1`` when
  normalising (the DPS step, always), else the target is ``a`` itself and ``mass = S``
  (PyTorch's soft-target cross-entropy for rows that do not sum to 1, docs/method.md §3);
- ``reduction="mean"/"sum"`` is finished in the same launch: every program writes
  its partial sum, and the last one to finish (an atomic ticket) adds the partials
  in program order (deterministic) and resets the ticket. No host synchronisation.

All offsets are int64. Rows with an out-of-range id or non-finite logits never
touch the bank; their loss and gradient are NaN.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._rounding import to_dtype

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
def _view_stats(Z, A, rows, rmask, ids, ok, a_acc, cols, B, C, stride_a, inv_tau_e, v: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_C: tl.constexpr, TEMPER: tl.constexpr):
    """Pass 1 for view v: online max m, softmax normaliser s (and se of the tempered one),
    whether every logit is finite; with view 0, the bank row accumulated into a_acc by column
    (a per-trip tl.sum here crashed triton 3.8's TritonGPUOptimizeThreadLocality pass, sm_90,
    for the unnormalised soft CE)."""
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], dtype=tl.float32)
    se = tl.zeros([ROWS], dtype=tl.float32)
    n_bad = tl.zeros([ROWS], dtype=tl.int32)
    base = (v * B + rows) * C
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        msk = rmask[:, None] & (cc < C)[None, :]
        z = tl.load(Z + base[:, None] + cc[None, :], mask=msk, other=0.0).to(tl.float32)
        if v == 0:  # the bank row, read in the same column loop as the logits
            amsk = ok[:, None] & (cc < C)[None, :]
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


@triton.jit
def _dps_ce_kernel(
    Z, IDX, A, G, LOSS, PART, TICKET,
    B, C, N, stride_a, gamma, inv_tau_e, gscale, out_scale,
    V: tl.constexpr, VP: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    POSTERIOR: tl.constexpr, UPDATE: tl.constexpr, TEMPER: tl.constexpr, HAS_GRAD: tl.constexpr,
    REDUCE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_IDX: tl.constexpr, BLOCK_P: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rmask = rows < B
    cols = tl.arange(0, BLOCK_C)
    vcol = tl.arange(0, VP)
    ids = tl.load(IDX + rows, mask=rmask, other=0).to(tl.int64) if HAS_IDX else rows
    ok = rmask & (ids >= 0) & (ids < N)

    # ---- pass 1: per view, online max and softmax normalisers; with view 0, the bank row's sum
    m_all = tl.zeros([ROWS, VP], dtype=tl.float32)
    s_all = tl.zeros([ROWS, VP], dtype=tl.float32)
    se_all = tl.zeros([ROWS, VP], dtype=tl.float32)
    a_acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    for v in tl.static_range(V):
        m, s, se, finite, a_acc = _view_stats(Z, A, rows, rmask, ids, ok, a_acc, cols, B, C, stride_a, inv_tau_e,
                                              v, ROWS, BLOCK_C, TEMPER)
        ok = ok & finite
        sel = vcol[None, :] == v
        m_all = tl.where(sel, m[:, None], m_all)
        s_all = tl.where(sel, s[:, None], s_all)
        se_all = tl.where(sel, se[:, None], se_all)

    # ---- the target's row sum S, from pass 1 (no pass of its own): the evidence, a mean of
    # softmaxes, sums to 1, so the updated row sums to gamma * sum_j a_j + 1 (docs/method.md §2)
    S = gamma * tl.sum(a_acc, 1) + 1.0 if POSTERIOR else tl.sum(a_acc, 1)
    # the target is a / S, of mass 1 (NORMALIZE: the DPS step), or a itself, of mass S
    target_scale = tl.where(ok, 1.0 / tl.where(ok, S, 1.0), 0.0) if NORMALIZE else tl.where(ok, 1.0, 0.0)
    mass = 1.0 if NORMALIZE else S

    # ---- pass 2: bank store, target, loss dot products, gradient
    dots = tl.zeros([ROWS, VP], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        cmask = (cc < C)[None, :]
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

    # ---- loss per view and row: mass * logsumexp - <t, z> = mass * log(s) + 2 * half gap
    log_s = tl.log(tl.where(s_all > 0, s_all, 1.0))
    loss = tl.where(ok[:, None], (log_s if NORMALIZE else mass[:, None] * log_s) + 2.0 * dots, float("nan"))
    _write_loss(LOSS, PART, TICKET, loss, rows, rmask, vcol, B, out_scale, V, REDUCE, BLOCK_P)


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


def _config(b: int, c: int, v: int):
    """(ROWS, BLOCK_C, num_warps): pack rows for small C, loop blocks for large C."""
    if _INTERPRET:  # few, large programs: the interpreter costs milliseconds per program
        block_c = min(triton.next_power_of_2(max(c, 16)), 32768)
        rows = max(1, min(triton.next_power_of_2(max(b, 1)), 65536 // block_c))
        return rows, block_c, 4
    # A tile of at most 2048 (V=1: 4096 for one wide row) fp32 elements, spread at about 8 per
    # thread: `tools/triton_aot_check.py` (ptxas -v, sm_90) showed 16-32 per thread spilling
    # registers (up to 1.6 kB per thread at 32 rows x 128 columns, 4 warps).
    block_c = min(triton.next_power_of_2(max(c, 16)), 4096 if v == 1 else 2048)
    rows = max(1, min(64, 2048 // block_c))
    rows = min(rows, triton.next_power_of_2(max(b, 1)))
    warps = max(4, min(16, rows * block_c // 256))
    return rows, block_c, warps


def _launch(z, idx, a, grad, gamma, tau_e, posterior, update, reduction, normalize):
    v = z.shape[0] if z.dim() == 3 else 1
    b, c = z.shape[-2], z.shape[-1]
    z = z.contiguous()
    has_grad = grad.numel() > 0
    if has_grad and not grad.is_contiguous():
        raise ValueError("dps_fast: grad buffer must be contiguous")
    if a.dim() != 2 or (a.shape[1] > 1 and a.stride(1) != 1):
        raise ValueError("dps_fast: bank/target must be [N, C] with unit class stride")
    rows, block_c, warps = _config(b, c, v)
    grid = (triton.cdiv(b, rows),)
    dev = z.device
    if reduction == 0:
        loss = torch.empty(z.shape[:-1], dtype=torch.float32, device=dev)
    else:
        loss = torch.empty((), dtype=torch.float32, device=dev)
    part = torch.empty(grid[0], dtype=torch.float32, device=dev)
    out_scale = 1.0 / (v * b) if reduction == 1 else 1.0
    _dps_ce_kernel[grid](
        z, idx if idx is not None else z, a, grad if has_grad else z, loss, part, _ticket(dev),
        b, c, a.shape[0], a.stride(0), float(gamma), 1.0 / float(tau_e),
        out_scale if reduction == 1 else 1.0, out_scale,
        V=v, VP=triton.next_power_of_2(v), ROWS=rows, BLOCK_C=block_c,
        POSTERIOR=bool(posterior), UPDATE=bool(update), TEMPER=float(tau_e) != 1.0, HAS_GRAD=has_grad,
        REDUCE=int(reduction), NORMALIZE=bool(normalize), HAS_IDX=idx is not None,
        BLOCK_P=min(1024, triton.next_power_of_2(grid[0])), num_warps=warps,
    )
    return loss


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
    """The configurations tools/triton_aot_check.py compiles for sm_90 (no GPU needed):
    the benchmark shapes, with the GPU launcher's (ROWS, BLOCK_C, warps)."""
    def case(name, b, c, v, z="fp32", bank="fp32", idx="i64", reduction=1, posterior=True, update=True,
             temper=False, grad=True, soft=False, normalize=True):
        return dict(name=name, shape=[v, b, c], z=z, bank=bank, idx=idx, reduction=reduction,
                    posterior=posterior, update=update, temper=temper, grad=grad, soft=soft, normalize=normalize)
    return [
        case("dps 256x100 fp32/fp32 mean", 256, 100, 1),
        case("dps 1024x1000 bf16/bf16 mean", 1024, 1000, 1, z="bf16", bank="bf16"),
        case("dps 65536x1000 bf16/fp32 sum i32-index", 65536, 1000, 1, z="bf16", idx="i32", reduction=2),
        case("dps 8192x32000 fp32/fp32 none", 8192, 32000, 1, reduction=0),
        case("dps 8192x32000 fp16/bf16 mean", 8192, 32000, 1, z="fp16", bank="bf16"),
        case("dps 2 views 1024x1000 tau_e fp32 mean", 1024, 1000, 2, temper=True),
        case("dps 2 views 4096x32000 bf16 no-grad", 4096, 32000, 2, z="bf16", grad=False),
        case("dps update-only 4096x10", 4096, 10, 1, posterior=False),
        case("soft-ce 4096x1000 fp32", 4096, 1000, 1, soft=True),
        case("soft-ce 4096x1000 fp32 unnormalised", 4096, 1000, 1, soft=True, normalize=False),
        case("soft-ce 4096x131072 bf16", 4096, 131072, 1, z="bf16", bank="bf16", soft=True),
    ]


def aot_signature(case):
    """(jit function, argument types, constexprs, launch config) of one AOT case."""
    v, b, c = case["shape"]
    rows, block_c, warps = case.get("override") or _config(b, c, v)
    z, bank, soft = case["z"], case["bank"], case["soft"]
    types = dict(Z=f"*{z}", IDX=f"*{case['idx']}" if not soft else f"*{z}", A=f"*{bank}",
                 G=f"*{z}", LOSS="*fp32", PART="*fp32", TICKET="*i32", B="i32", C="i32", N="i32",
                 stride_a="i64", gamma="fp32", inv_tau_e="fp32", gscale="fp32", out_scale="fp32")
    nprog = triton.cdiv(b, rows)
    const = dict(V=v, VP=triton.next_power_of_2(v), ROWS=rows, BLOCK_C=block_c,
                 POSTERIOR=case["posterior"] and not soft, UPDATE=case["update"] and not soft,
                 TEMPER=case["temper"], HAS_GRAD=case["grad"], REDUCE=case["reduction"],
                 NORMALIZE=case["normalize"] or not soft, HAS_IDX=not soft,
                 BLOCK_P=min(1024, triton.next_power_of_2(nprog)))
    return _dps_ce_kernel, types, const, dict(ROWS=rows, BLOCK_C=block_c, num_warps=warps)

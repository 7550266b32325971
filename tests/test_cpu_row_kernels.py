"""The fused CPU DPS kernel's fast paths, bit for bit: its exp against ATen's exp_u20,
the streaming-store path against ordinary stores, one large batch against many small
ones on one or two threads; and the non-finite policy applies to non-finite logits only.
The small-C path (eight rows per tile) against the fp64 reference, lane by lane."""
import itertools
import os
import platform
import shutil
import subprocess

import pytest
import torch

import dps_fast
from dps_fast import _dispatch
from _helpers import rule_check

pytestmark = pytest.mark.skipif(not _dispatch.available("cpu", "cpu"), reason="C++ extension not built")

STREAM_MIN_BYTES = 32 << 20  # kStreamMinBytes in csrc/cpu/dps_cross_entropy.cpp


def _floats(bits):
    """int64 bit patterns in [0, 2^32) -> float32 with those bits."""
    return torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32).view(torch.float32)


def _bits_range(lo, hi, step=1):
    return torch.arange(lo, hi, step, dtype=torch.int64)


def _nonpos_samples():
    """Non-positive floats: every 1021st bit pattern of -0 .. -Inf, every float in
    [-90, -86] (ln(FLT_MIN) = -87.34 and the last normal results), the 2^16 floats
    each side of -ln(2)/2 and of -1, the smallest subnormals, and +0, -Inf."""
    f = torch.tensor
    parts = [_bits_range(0x80000000, 0xFF800001, 1021),
             _bits_range(0xC2AC0000, 0xC2B40001),  # -86 .. -90
             _bits_range(0xBEB17218 - 2 ** 16, 0xBEB17218 + 2 ** 16),  # -ln(2)/2
             _bits_range(0xBF800000 - 2 ** 16, 0xBF800000 + 2 ** 16),  # -1
             _bits_range(0x80000000, 0x80010000),  # -0 and the smallest negative subnormals
             f([0x00000000, 0xFF800000], dtype=torch.int64)]
    return _floats(torch.cat(parts))


def _check_exp(x):
    ours, aten = torch.ops.dps_fast_testing.exp_nonpos(x)
    same = ours.view(torch.int32) == aten.view(torch.int32)
    bad = (~same).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} differ, e.g. x={x[bad[0]].item()!r}: {ours[bad[0]].item()!r} " \
                             f"vs exp_u20 {aten[bad[0]].item()!r}"


def test_exp_nonpos_is_exp_u20_bit_for_bit():
    _check_exp(_nonpos_samples())


@pytest.mark.skipif(os.environ.get("DPS_FAST_EXHAUSTIVE") != "1", reason="set DPS_FAST_EXHAUSTIVE=1 (minutes)")
def test_exp_nonpos_is_exp_u20_on_every_nonpositive_float():
    for lo in range(0x80000000, 0xFF800001, 2 ** 22):
        _check_exp(_floats(_bits_range(lo, min(lo + 2 ** 22, 0xFF800001))))


def test_exp_nonpos_propagates_nan():
    x = torch.tensor([float("nan"), -1.0, float("nan"), 0.0] * 3)
    ours, _ = torch.ops.dps_fast_testing.exp_nonpos(x)
    assert torch.equal(torch.isnan(ours), torch.isnan(x))


def _problem(b, c, n, seed):
    gen = torch.Generator().manual_seed(seed)
    alpha = dps_fast.init_prior(torch.randint(0, c, (n,), generator=gen), c, c=5.0, eps=0.05)
    alpha += torch.rand(n, c, generator=gen)
    z = torch.randn(b, c, generator=gen) * 3
    idx = torch.randperm(n, generator=gen)[:b]
    z[5, 7] = float("nan")  # non-finite rows, in the middle of streamed rows
    z[6, 0] = float("-inf")
    z[7, -1] = float("inf")
    idx[9] = n + 3  # out of range: skipped (only reachable with validate=False)
    return z, idx, alpha


def _step(z, idx, alpha, gamma=0.9, posterior=True):
    grad = torch.empty_like(z)
    loss = torch.ops.dps_fast.dps_ce_fwd(z, idx, alpha, grad, gamma, 1.0, posterior, True, 0)
    return loss, grad


def _bits_equal(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("posterior", [True, False])
def test_streamed_batch_equals_small_batches_bit_for_bit(posterior):
    b, c, n = 2304, 1000, 4000
    assert b * c * 16 > STREAM_MIN_BYTES  # the large call streams its gradient
    z, idx, alpha = _problem(b, c, n, seed=7)
    a_big = alpha.clone()
    loss_big, grad_big = _step(z, idx, a_big, posterior=posterior)
    a_small = alpha.clone()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        parts = [_step(z[s:s + 64], idx[s:s + 64], a_small, posterior=posterior) for s in range(0, b, 64)]
    finally:
        torch.set_num_threads(threads)
    loss_small = torch.cat([p[0] for p in parts])
    grad_small = torch.cat([p[1] for p in parts])
    assert _bits_equal(loss_big, loss_small)
    assert _bits_equal(grad_big, grad_small)
    assert _bits_equal(a_big, a_small)
    # and the policies held on the streamed path
    assert torch.isnan(loss_big[5:10]).tolist() == [True, True, True, False, True]
    assert torch.isnan(grad_big[5:8]).all() and torch.isfinite(grad_big[8]).all()
    assert torch.equal(a_big[idx[5:8]], alpha[idx[5:8]]) and not torch.equal(a_big[idx[8]], alpha[idx[8]])


def test_finite_logits_whose_sum_overflows_are_not_treated_as_non_finite():
    c = 1000
    z = torch.full((2, c), 1e36)  # every logit finite; their float32 sum is +Inf
    z[1] = torch.linspace(-1e36, 1e36, c)
    alpha = dps_fast.init_prior(torch.tensor([3, 4, 5]), c)
    a_ref = alpha.clone()
    idx = torch.tensor([0, 2])
    loss = dps_fast.dps_cross_entropy(z, idx, alpha, reduction="none", backend="cpu")
    ref = dps_fast.dps_cross_entropy(z, idx, a_ref, reduction="none", backend="reference")
    assert torch.isfinite(loss).all() and torch.isfinite(ref).all()
    torch.testing.assert_close(alpha, a_ref)
    assert not torch.equal(alpha[0], dps_fast.init_prior(torch.tensor([3]), c)[0])


SMALL_C = 16  # kSmallC in csrc/cpu/dps_cross_entropy.cpp
FMAX = torch.finfo(torch.float32).max


def _tile_problem(b, c, seed, bank_pad=0):
    """[b, c] logits with bad rows in first, last and inner lanes of several tiles, the partial
    last tile included: non-finite logits (NON_FINITE) and out-of-range ids (OUT_OF_RANGE); rows 3
    and 9 hold finite logits of +-FLT_MAX. The bank is a column slice of [n, c + bank_pad]."""
    gen = torch.Generator().manual_seed(seed)
    n = 3 * b + 5
    alpha = torch.rand(n, c + bank_pad, generator=gen) + 2.0
    alpha[:, :c] = dps_fast.init_prior(torch.randint(0, c, (n,), generator=gen), c, c=5.0, eps=0.05)
    alpha[:, :c] += torch.rand(n, c, generator=gen)
    z = torch.randn(b, c, generator=gen) * 3
    idx = torch.randperm(n, generator=gen)[:b]
    for row, (col, value) in _non_finite(b, c).items():
        z[row, col] = value
    for row in _out_of_range(b):
        idx[row] = n + 7 + row
    for row in (r for r in (3, 9) if r < b):
        z[row, 0] = FMAX
        z[row, -1] = -FMAX if c > 1 else FMAX
    return z, idx, alpha


def _non_finite(b, c):
    """row -> (column, value): lanes 0 and 7 of tile 0, lane 2 of tile 1, the last row (b > 8)."""
    rows = {0: (c // 2, float("nan")), 7: (0, float("-inf")), 10: (c - 1, float("inf")),
            b - 1: (0, float("nan"))}
    return {r: v for r, v in rows.items() if r < b and b >= 8}


def _out_of_range(b):
    return [r for r in (4, 12) if r < b - 1]


def _public_step(z, idx, alpha, backend, upstream, reduction="none", **kw):
    x = z.clone().requires_grad_(True)
    a = alpha.clone()
    loss = dps_fast.dps_cross_entropy(x, idx, a, reduction=reduction, backend=backend, validate=False, **kw)
    loss.backward(upstream)
    return loss.detach(), x.grad, a


TILE_MODES = [dict(tau_e=1.0, target="posterior", update=True), dict(tau_e=2.0, target="prior", update=True),
              dict(tau_e=0.5, target="posterior", update=False), dict(tau_e=1.0, target="prior", update=False)]


@pytest.mark.parametrize("c", range(1, SMALL_C + 2))
def test_small_c_tiles_match_the_reference_lane_by_lane(c):
    """C <= 16 (float32, one view) runs eight rows per tile, one row per lane (SmallCStep; C = 17
    takes the row path): every row against the fp64 reference by the tolerance rule, in batches
    that end inside a tile, with bad rows in several lanes and tiles (docs/method.md §9), every
    mode, and a bank that is a column slice (row stride > C) whose other columns stay."""
    for b, kw, pad in itertools.product((1, 8, 9, 23), TILE_MODES, (0, 3)):
        z, idx, alpha = _tile_problem(b, c, seed=100 * c + b, bank_pad=pad)
        bank = alpha[:, :c]
        upstream = torch.rand(b, generator=torch.Generator().manual_seed(b)) + 0.5
        lk, gk, ak = _public_step(z, idx, bank, "cpu", upstream, gamma=0.9, **kw)
        le, ge, ae = _public_step(z, idx, bank, "reference", upstream, gamma=0.9, **kw)
        lx, gx, ax = _public_step(z.double(), idx, bank.double(), "reference", upstream.double(), gamma=0.9, **kw)
        what = f"B={b} pad={pad} {kw}"
        for r in range(b):  # a row's loss is a difference of terms up to 2 max|z|
            scale = 2 * float(z[r].double().abs().nan_to_num(0, 0, 0).max()) + 10
            rule_check(lk[r], le[r], lx[r], torch.float32, f"loss row {r}, {what}", scale=scale)
            rule_check(gk[r], ge[r], gx[r], torch.float32, f"grad row {r}, {what}")
        rule_check(ak, ae, ax, torch.float32, f"bank, {what}")
        bad = set(_non_finite(b, c)) | set(_out_of_range(b))
        assert torch.isnan(lk).tolist() == [r in bad for r in range(b)], what
        written = torch.zeros(alpha.shape[0], dtype=torch.bool)
        written[idx[[r for r in range(b) if r not in bad]]] = kw["update"]
        assert torch.equal(ak[~written], bank[~written]), f"a bank row that must stay was written, {what}"
        assert (ak[written] != bank[written]).any(1).all(), f"a row was not updated, {what}"
        if pad:  # the sliced bank was updated in place: the columns past C are the parent's
            parent = alpha.clone()
            dps_fast.dps_cross_entropy(z.clone(), idx, parent[:, :c], reduction="none", backend="cpu",
                                       validate=False, gamma=0.9, **kw)
            assert torch.equal(parent[:, c:], alpha[:, c:]), f"columns past C were written, {what}"


@pytest.mark.parametrize("c", [10, 16])
def test_small_c_tiles_on_two_threads_equal_small_batches_bit_for_bit(c):
    """A batch split between two threads (tasks of whole tiles) against 64-row batches on one
    thread: every operation is per lane, so a row's result cannot depend on its tile or task."""
    b = 1203
    z, idx, alpha = _tile_problem(b, c, seed=c)
    a_big, a_small = alpha.clone(), alpha.clone()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        loss_big, grad_big = _step(z, idx, a_big)
        torch.set_num_threads(1)
        parts = [_step(z[s:s + 64], idx[s:s + 64], a_small) for s in range(0, b, 64)]
    finally:
        torch.set_num_threads(threads)
    assert _bits_equal(loss_big, torch.cat([p[0] for p in parts]))
    assert _bits_equal(grad_big, torch.cat([p[1] for p in parts]))
    assert _bits_equal(a_big, a_small)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_small_c_inplace_gradient_equals_a_separate_buffer(reduction):
    """inplace_grad writes the gradient over the logits a tile has read: the same bits as into a
    new buffer (a tile loads all eight rows' logits before it stores any gradient)."""
    z, idx, alpha = _tile_problem(23, 10, seed=5)
    z = z.nan_to_num(0.0, 0.0, 0.0)  # finite rows only: a NaN gradient row compares unequal to itself
    results = []
    for inplace in (False, True):
        x = z.clone().requires_grad_(True)
        a = alpha.clone()
        loss = dps_fast.dps_cross_entropy(x, idx, a, reduction=reduction, backend="cpu", validate=False,
                                          inplace_grad=inplace)
        loss.backward()
        results.append((loss.detach(), x.grad.clone(), a))
    for got, want in zip(results[1], results[0]):
        assert _bits_equal(got, want)


@pytest.mark.skipif(shutil.which("objdump") is None or platform.machine() != "x86_64",
                    reason="needs binutils' objdump on x86-64")
def test_the_bank_row_prefetches_are_in_the_build():
    """GCC 12 dropped every loop of __builtin_prefetch calls from the build once, silently
    (csrc/cpu/row_kernels.h, prefetch_line): the kernels' prefetches must be in _C.so."""
    library = os.environ.get("DPS_FAST_TEST_OPS_LIBRARY")  # make sanitize's build (tests/conftest.py)
    if library is None:
        import dps_fast._C as ext
        library = ext.__file__
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True,
                             text=True, check=True).stdout
    assert "prefetcht1" in listing, "no bank-row prefetch instruction in dps_fast._C"

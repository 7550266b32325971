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


def _tile_problem(b, c, seed):
    """[b, c] logits whose rows 2-6 (where b allows) are bad or extreme: a NaN, a -inf, a +inf
    logit, an out-of-range id, and finite logits of +-FLT_MAX; the ids leave bank rows untouched."""
    gen = torch.Generator().manual_seed(seed)
    n = 3 * b + 5
    alpha = dps_fast.init_prior(torch.randint(0, c, (n,), generator=gen), c, c=5.0, eps=0.05)
    alpha += torch.rand(n, c, generator=gen)
    z = torch.randn(b, c, generator=gen) * 3
    idx = torch.randperm(n, generator=gen)[:b]
    rows = {2: (c // 2, float("nan")), 3: (0, float("-inf")), 4: (c - 1, float("inf")), 6: (0, FMAX)}
    for row, (col, value) in rows.items():
        if row < b:
            z[row, col] = value
    if b > 6 and c > 1:
        z[6, -1] = -FMAX
    if b > 5:
        idx[5] = n + 7
    return z, idx, alpha


def _public_step(z, idx, alpha, backend, upstream, **kw):
    x = z.clone().requires_grad_(True)
    a = alpha.clone()
    loss = dps_fast.dps_cross_entropy(x, idx, a, reduction="none", backend=backend, validate=False, **kw)
    loss.backward(upstream)
    return loss.detach(), x.grad, a


@pytest.mark.parametrize("c", range(1, SMALL_C + 2))
def test_small_c_tiles_match_the_reference_lane_by_lane(c):
    """C <= 16 (float32, one view) runs eight rows per tile, one row per lane (SmallCStep; C = 17
    takes the row path): every row against the fp64 reference by the tolerance rule, in batches
    that end inside a tile, with bad rows inside a tile (docs/method.md §9) and all modes."""
    modes = [dict(tau_e=1.0, target="posterior", update=True), dict(tau_e=2.0, target="prior", update=True),
             dict(tau_e=0.5, target="posterior", update=False)]
    for b, kw in itertools.product((1, 8, 9, 23), modes):
        z, idx, alpha = _tile_problem(b, c, seed=100 * c + b)
        upstream = torch.rand(b, generator=torch.Generator().manual_seed(b)) + 0.5
        lk, gk, ak = _public_step(z, idx, alpha, "cpu", upstream, gamma=0.9, **kw)
        le, ge, ae = _public_step(z, idx, alpha, "reference", upstream, gamma=0.9, **kw)
        lx, gx, ax = _public_step(z.double(), idx, alpha.double(), "reference", upstream.double(), gamma=0.9, **kw)
        what = f"B={b} {kw}"
        for r in range(b):  # a row's loss is a difference of terms up to 2 max|z|
            scale = 2 * float(z[r].double().abs().nan_to_num(0, 0, 0).max()) + 10
            rule_check(lk[r], le[r], lx[r], torch.float32, f"loss row {r}, {what}", scale=scale)
            rule_check(gk[r], ge[r], gx[r], torch.float32, f"grad row {r}, {what}")
        rule_check(ak, ae, ax, torch.float32, f"bank, {what}")
        assert torch.equal(ak, ae) or kw["update"], "a read-only step wrote the bank"
        written = torch.zeros(alpha.shape[0], dtype=torch.bool)
        good = [r for r in range(b) if r not in (2, 3, 4, 5)]
        written[idx[good]] = kw["update"]
        assert torch.equal(ak[~written], alpha[~written]), f"a bank row that must stay was written, {what}"
        assert (ak[written] != alpha[written]).any(1).all(), f"a row was not updated, {what}"


@pytest.mark.skipif(shutil.which("objdump") is None or platform.machine() != "x86_64",
                    reason="needs binutils' objdump on x86-64")
def test_the_bank_row_prefetches_are_in_the_build():
    """GCC deletes a loop whose body is only __builtin_prefetch calls (-ffinite-loops): the
    kernels' prefetches vanished that way once, silently (csrc/cpu/row_kernels.h, prefetch_line)."""
    import dps_fast._C as ext
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", ext.__file__], capture_output=True,
                             text=True, check=True).stdout
    assert listing.count("prefetcht1") >= 4, "no bank-row prefetch instructions in dps_fast._C"

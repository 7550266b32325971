"""The edge-case policies of docs/method.md §9 (was test_hardening.py): no call is silently
wrong, and no failed call changes the bank, in any backend."""
import pytest
import torch
import torch.nn.functional as F

import dps_fast
from dps_fast import reference as R
from _helpers import ALL_BACKENDS, FUSED, case_id, rule_check


def _bank(device="cpu", n=12, c=5, dtype=torch.float32):
    return dps_fast.init_prior(torch.arange(n) % c, c, c=4.0, eps=0.5, dtype=dtype).to(device)


# ---------------------------------------------------------------- 1. autograd
@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_double_backward_is_an_error_not_a_wrong_number(case):
    backend, device = case
    z = torch.randn(4, 5, device=device, requires_grad=True)
    for loss in (dps_fast.dps_cross_entropy(z, torch.arange(4, device=device), _bank(device), backend=backend),
                 dps_fast.soft_cross_entropy(z, torch.softmax(torch.randn(4, 5, device=device), -1), backend=backend)):
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad(loss, z, create_graph=True)


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_backward_moves_the_gradient_buffer_unless_it_must_copy(case):
    """loss.backward() with the graph freed hands the forward's gradient buffer to .grad (no
    B x C copy), scaled in place for an upstream gradient other than 1; a kept graph gets a
    new tensor (tests/test_attach_grad.py), right."""
    backend, device = case
    x = torch.randn(6, 5, device=device, requires_grad=True)
    dps_fast.dps_cross_entropy(x, torch.arange(6, device=device), _bank(device), backend=backend,
                               inplace_grad=True).backward()
    assert x.grad.data_ptr() == x.data_ptr() or device != "cpu"  # the buffer is x's own storage
    for kw, scale, moved in (({"retain_graph": True}, 1.0, False),
                             ({"gradient": torch.tensor(3.0, device=device)}, 3.0, True)):
        x = torch.randn(6, 5, device=device, requires_grad=True)
        want = torch.autograd.grad(dps_fast.dps_cross_entropy(x, torch.arange(6, device=device), _bank(device),
                                                              backend="reference"), x)[0]
        dps_fast.dps_cross_entropy(x, torch.arange(6, device=device), _bank(device), backend=backend,
                                   inplace_grad=True).backward(**kw)
        assert (x.grad.data_ptr() == x.data_ptr()) == (moved and device == "cpu") or device != "cpu"
        torch.testing.assert_close(x.grad, scale * want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
def test_forward_mode_ad_is_exact_or_an_error(case):
    """A dual tensor (torch.autograd.forward_ad) carries a tangent that a fused kernel would
    drop: the automatic choice takes the reference, whose tangent is <d loss / d z, v>; a
    named fused backend is an error raised before the bank is written."""
    import torch.autograd.forward_ad as fwad

    backend, device = case
    z, v = torch.randn(4, 5, device=device), torch.randn(4, 5, device=device)
    idx, t = torch.arange(4, device=device), torch.softmax(torch.randn(4, 5, device=device), -1)
    calls = {"dps": lambda x, bank, be: dps_fast.dps_cross_entropy(x, idx, bank, backend=be),
             "soft_ce": lambda x, bank, be: dps_fast.soft_cross_entropy(x, t, backend=be)}
    for what, call in calls.items():
        zz = z.clone().requires_grad_(True)
        call(zz, _bank(device), "reference").backward()
        want = (zz.grad * v).sum()
        for be in (None, backend):
            bank = _bank(device)
            with fwad.dual_level():
                x = fwad.make_dual(z, v)
                if be in (None, "reference"):
                    torch.testing.assert_close(fwad.unpack_dual(call(x, bank, be)).tangent, want, msg=what)
                    continue
                with pytest.raises(RuntimeError, match="forward-mode AD"):
                    call(x, bank, be)
                assert torch.equal(bank, _bank(device)), what


def test_reference_double_backward_is_exact():
    """The reference is the way to higher-order gradients: d2 l / dz2 = diag(p) - p p^T."""
    z = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    loss = dps_fast.dps_cross_entropy(z, torch.tensor([0]), _bank(dtype=torch.float64, c=4), backend="reference")
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    hess = torch.stack([torch.autograd.grad(g[0, j], z, retain_graph=True)[0][0] for j in range(4)])
    p = torch.softmax(z.detach()[0], -1)
    torch.testing.assert_close(hess, torch.diag(p) - p[:, None] * p[None, :])


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
def test_torch_func_grad_never_writes_the_bank(case):
    backend, device = case
    alpha = _bank(device)
    before = alpha.clone()
    idx = torch.tensor([1, 3], device=device)
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda z: dps_fast.dps_cross_entropy(z, idx, alpha, backend=backend))(
            torch.randn(2, 5, device=device))
    assert torch.equal(alpha, before)
    # read-only (update=False) works through the reference, and matches plain autograd
    z = torch.randn(2, 5, device=device)
    f = lambda z: dps_fast.dps_cross_entropy(z, idx, alpha, update=False)  # noqa: E731
    zz = z.clone().requires_grad_(True)
    f(zz).backward()
    torch.testing.assert_close(torch.func.grad(f)(z), zz.grad)
    assert torch.equal(alpha, before)


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_torch_func_with_an_explicit_fused_backend_is_a_clear_error(case):
    backend, device = case
    t = torch.softmax(torch.randn(3, 4, device=device), -1)
    with pytest.raises(RuntimeError, match="runs only on the reference backend"):
        torch.func.grad(lambda z: dps_fast.soft_cross_entropy(z, t, backend=backend))(torch.randn(3, 4, device=device))


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_inplace_grad_bumps_the_version_counter(case):
    """A saved tensor overwritten by the in-place gradient must be caught by autograd."""
    backend, device = case
    x = torch.randn(4, 5, device=device, requires_grad=True)
    z = x.exp()  # ExpBackward saves its output: z itself
    loss = dps_fast.dps_cross_entropy(z, torch.arange(4, device=device), _bank(device), backend=backend,
                                      inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------- 2. compile with default arguments
@pytest.mark.parametrize("case", [c for c in FUSED if c != ("triton", "cpu")] or FUSED, ids=case_id)
def test_dps_loss_compiles_fullgraph_with_validation_on(case):
    backend, device = case
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (40,))
    crit = dps_fast.DPSLoss(labels, 5, backend=backend, contrastive_weight=0.1).to(device)
    twin = dps_fast.DPSLoss(labels, 5, backend=backend, contrastive_weight=0.1).to(device)
    lin = torch.nn.Linear(8, 5).to(device)
    x, idx = torch.randn(2, 16, 8, device=device), torch.randperm(40)[:16].to(device)
    feats = torch.randn(2, 16, 4, device=device)

    def step(crit, x, idx):
        return crit(lin(x), idx, feats)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(crit, x, idx), step(twin, x, idx))
    torch.testing.assert_close(crit.alpha, twin.alpha)
    before = crit.alpha.clone()
    with pytest.raises(ValueError, match="duplicate id"):
        compiled(crit, x, torch.zeros(16, dtype=torch.int64, device=device))
    assert torch.equal(crit.alpha, before)


# ---------------------------------------------------------------- 3. a failed call changes nothing
@pytest.mark.parametrize("bad", ["missing", "batch", "views", "index dtype"])
def test_contrastive_checks_run_before_the_bank_is_written(bad):
    crit = dps_fast.DPSLoss(torch.arange(20) % 4, 4, contrastive_weight=0.5, con_positives="views")
    before = crit.alpha.clone()
    z, idx, f = torch.randn(2, 6, 4), torch.arange(6), torch.randn(2, 6, 8)
    args = {"missing": (z, idx, None), "batch": (z, idx, torch.randn(2, 5, 8)),
            "views": (z, idx, torch.randn(1, 6, 8)), "index dtype": (z, idx.float(), f)}[bad]
    with pytest.raises((ValueError, TypeError)):
        crit(*args)
    assert torch.equal(crit.alpha, before)


# ---------------------------------------------------------------- 4. backends agree on edge inputs
@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_every_integer_index_dtype_reads_as_int64(case, dtype):
    backend, device = case
    z = torch.randn(3, 5, device=device)
    idx = torch.tensor([2, 0, 11])
    a1, a2 = _bank(device), _bank(device)
    l1 = dps_fast.dps_cross_entropy(z, idx.to(device, dtype), a1, reduction="none", backend=backend)
    l2 = dps_fast.dps_cross_entropy(z, idx.to(device), a2, reduction="none", backend=backend)
    torch.testing.assert_close(l1, l2)
    assert torch.equal(a1, a2)
    crit = dps_fast.DPSLoss(torch.arange(12) % 5, 5, backend=backend).to(device)
    torch.testing.assert_close(crit.targets(idx.to(device, dtype)), crit.targets(idx.to(device)))
    torch.testing.assert_close(crit.posterior(idx.to(device, dtype))["label_error"],
                               crit.posterior(idx.to(device))["label_error"])


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
def test_unvalidated_negative_and_large_ids_are_skipped_everywhere(case):
    backend, device = case
    alpha = _bank(device)
    before = alpha.clone()
    loss = dps_fast.dps_cross_entropy(torch.randn(3, 5, device=device), torch.tensor([-1, 4, 12], device=device),
                                      alpha, reduction="none", backend=backend, validate=False)
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1]) and torch.isnan(loss[2])
    keep = torch.ones(12, dtype=torch.bool)
    keep[4] = False
    assert torch.equal(alpha[keep.to(device)], before[keep.to(device)])


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
def test_expanded_aliased_and_overlapping_banks_are_refused(case):
    backend, device = case
    z = torch.randn(2, 5, device=device)
    idx = torch.tensor([0, 1], device=device)
    expanded = torch.ones(1, 5, device=device).expand(12, 5)
    with pytest.raises(ValueError, match="expanded or self-overlapping"):
        dps_fast.dps_cross_entropy(z, idx, expanded, backend=backend)
    shared = torch.ones(14, 5, device=device)
    with pytest.raises(ValueError, match="shares memory with the logits"):
        dps_fast.dps_cross_entropy(shared[:2], idx, shared[2:], backend=backend)


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
def test_empty_batch_still_checks_everything(case):
    backend, device = case
    alpha = _bank(device)
    empty = torch.empty(0, 5, device=device)
    none = torch.empty(0, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="unknown backend"):
        dps_fast.dps_cross_entropy(empty, none, alpha, backend="nope")
    with pytest.raises(TypeError, match="floating-point"):
        dps_fast.dps_cross_entropy(empty.long(), none, alpha, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        dps_fast.soft_cross_entropy(empty, empty, backend="nope")
    assert float(dps_fast.dps_cross_entropy(empty, none, alpha, backend=backend)) == 0.0


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
def test_one_class_with_odd_strides(case):
    backend, device = case
    alpha = torch.full((1, 9), 2.0, device=device).t()  # [9, 1], strides (1, 9)
    z = torch.randn(5, 3, device=device)[:, 1:2]         # [5, 1], strides (3, 1)
    want_a = alpha.clone()
    want = R.dps_cross_entropy(z, torch.tensor([0, 2, 4, 6, 8]), want_a, reduction="none")
    got = dps_fast.dps_cross_entropy(z, torch.tensor([0, 2, 4, 6, 8], device=device), alpha, reduction="none",
                                     backend=backend)
    torch.testing.assert_close(got.cpu(), want.cpu())
    torch.testing.assert_close(alpha.cpu(), want_a.cpu())


# ---------------------------------------------------------------- 5. invalid numbers never reach the bank
def test_tiny_tau_e_is_refused():
    with pytest.raises(ValueError, match="tau_e must be at least"):
        dps_fast.dps_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), _bank(c=3), tau_e=1e-40)
    with pytest.raises(ValueError, match="tau_e must be at least"):
        dps_fast.DPSLoss(torch.arange(4) % 2, 2, tau_e=1e-40)


@pytest.mark.parametrize("dtype,c,eps", [(torch.float16, 100.0, 1e-8), (torch.float16, 1e5, 0.01),
                                         (torch.bfloat16, 1e39, 0.01)])
def test_prior_values_are_checked_in_the_bank_dtype(dtype, c, eps):
    with pytest.raises(ValueError, match="bank dtype"):
        dps_fast.init_prior(torch.arange(4) % 2, 2, c=c, eps=eps, dtype=dtype)
    with pytest.raises(ValueError, match="bank dtype"):
        dps_fast.DPSLoss(torch.arange(4) % 2, 2, c=c, eps=eps, bank_dtype=dtype)
    prior = dps_fast.init_prior(torch.arange(4) % 2, 2, c=4.0, eps=1.0, dtype=torch.float64)
    prior[0, 1] = eps
    prior[1, 1] = c
    with pytest.raises(ValueError, match="bank dtype"):
        dps_fast.DPSLoss(prior=prior, bank_dtype=dtype)


HUGE, FMAX = 3e38, torch.finfo(torch.float32).max


def _huge_logits(c=7):
    """[2, 7, c] logits: view 0 holds finite values near the float32 maximum (a running sum of
    rows 1 and 2 overflows in any order), rows 4 and 6 a NaN / -inf in one view only."""
    z = torch.randn(2, 7, c, generator=torch.Generator().manual_seed(7)) * 3
    z[0, 0, :2] = torch.tensor([HUGE, -HUGE])
    z[0, 1, :3] = HUGE
    z[0, 2, :-1] = -HUGE
    z[0, 3, :2] = torch.tensor([FMAX, -FMAX])
    z[1, 4, 3] = float("nan")
    z[0, 5, 0] = HUGE
    z[0, 6, 1] = float("-inf")
    return z


def _row_scale(z):
    """A row's loss is a difference of terms up to 2 max|z| (rule_check's scale for sums)."""
    return 2 * float(z.double().abs().nan_to_num(0, 0, 0).max()) + 10


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
@pytest.mark.parametrize("adt", [torch.float32, torch.bfloat16], ids=lambda d: f"bank_{str(d)[6:]}")
def test_huge_finite_logits_are_never_treated_as_non_finite(case, adt):
    """docs/method.md §9: |z| up to the float32 maximum is finite. Every backend against the
    fp64 reference by the tolerance rule: those rows are updated and finite, and the NaN
    pattern (rows with a NaN or -inf logit) is the reference's."""
    backend, device = case
    z = _huge_logits()
    c = z.shape[-1]
    labels = torch.tensor([0, 0, c - 1, 0, 0, 0, 0, 3, 4])  # the label is where a row's largest logits are
    alpha = dps_fast.init_prior(labels, c, c=4.0, eps=0.5, dtype=adt)
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 6])

    def step(backend, z, alpha, device):
        x = z.clone().to(device).requires_grad_(True)
        a = alpha.clone().to(device)
        loss = dps_fast.dps_cross_entropy(x, idx.to(device), a, reduction="none", backend=backend)
        loss.backward(torch.ones_like(loss))
        return loss.detach().cpu(), x.grad.cpu(), a.cpu()

    lk, gk, ak = step(backend, z, alpha, device)
    le, ge, ae = step("reference", z, alpha, "cpu")
    lx, gx, ax = step("reference", z.double(), alpha.double(), "cpu")
    for b in range(7):
        rule_check(lk[:, b], le[:, b], lx[:, b], torch.float32, f"loss row {b}", scale=_row_scale(z[:, b]))
        rule_check(gk[:, b], ge[:, b], gx[:, b], torch.float32, f"grad row {b}")
    rule_check(ak, ae, ax, adt, "bank")
    finite = torch.tensor([True, True, True, True, False, True, False])
    assert torch.equal(torch.isnan(lk).any(0), ~finite)
    assert torch.isfinite(ak).all()
    assert (ak[:7][finite] != alpha[:7][finite]).any(1).all(), "a row with huge finite logits was not updated"
    assert torch.equal(ak[:7][~finite], alpha[:7][~finite]), "a row with a non-finite logit was written"


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
def test_huge_finite_logits_in_soft_cross_entropy(case):
    """The same logits in soft_cross_entropy: finite rows match the fp64 cross-entropy to a
    float32 rounding of their terms (PyTorch's own float32 result is inf for some of them: its
    log_softmax overflows), the row with a -inf logit is NaN (docs/method.md §9)."""
    backend, device = case
    z = _huge_logits()[0]
    t = torch.softmax(torch.randn(z.shape, generator=torch.Generator().manual_seed(1)), -1)
    t[:, 0] += 4.0  # most mass where the largest logits are: no overflow of the exact loss
    t = t / t.sum(1, keepdim=True) * torch.tensor([1.0, 0.3, 1.0, 0.3, 1.0, 0.3, 1.0])[:, None]  # s_b * max|z| < FLT_MAX
    t[2] = t[2].flip(0)
    x = z.clone().to(device).requires_grad_(True)
    got = dps_fast.soft_cross_entropy(x, t.to(device), reduction="none", backend=backend)
    got.sum().backward()
    ex = z.double().requires_grad_(True)
    want = F.cross_entropy(ex, t.double(), reduction="none")
    want.sum().backward()
    assert torch.equal(torch.isnan(got.cpu()), torch.tensor([False] * 4 + [False, False, True]))
    for b in range(7):
        if b != 6:
            tol = 1e-6 * _row_scale(z[b])
            g, w = float(got[b].detach()), float(want[b].detach())
            assert abs(g - w) <= tol, (b, g, w)
            torch.testing.assert_close(x.grad[b].cpu().double(), ex.grad[b], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- 8. read-outs in chunks
def test_readouts_in_chunks_match_one_pass():
    alpha = torch.rand(1001, 7, dtype=torch.float64) * 5 + 0.01
    labels = torch.randint(0, 7, (1001,))
    whole = R.posterior_readouts(alpha, labels, chunk_rows=10 ** 9)
    for chunk in (1, 64, 1000):
        part = R.posterior_readouts(alpha, labels, chunk_rows=chunk)
        for k in whole:
            torch.testing.assert_close(part[k], whole[k], msg=k)
    assert set(whole) == {"mean", "alpha0", "entropy", "expected_entropy", "mutual_information", "label_error"}
    assert "mean" not in R.posterior_readouts(alpha, labels, mean=False)

"""The fused CPU kernel of the top-k step (csrc/cpu/topk_step.cpp; docs/method.md §12, issue 26)
against the reference step (dps_fast/topk.py::reference_step): the same new ids, values, rest
and bound, loss and gradient, by the tolerance rule against the float64 reference, over C, k,
views, tau_e, targets, reductions, update, non-finite rows, ids outside the bank, a non-unit
upstream gradient and the rows the batch does not touch."""
import pytest
import torch

import dps_fast
from dps_fast import topk as T
from _helpers import HAS_CPU, rule_check
from _topk_cases import (SETTINGS, bank_state, check_ids_outside_are_skipped, check_tie_heavy, check_wide_row, clone,
                         compare_step, run)

pytestmark = pytest.mark.skipif(not HAS_CPU, reason="the C++ ops are not built")


CASES = [(c, k, v) for c, k in [(2, 1), (5, 2), (7, 6), (33, 20), (100, 8), (1000, 32), (3000, 64)] for v in (1, 3)]


@pytest.mark.parametrize("c,k,views", CASES, ids=[f"C{c}-k{k}-V{v}" for c, k, v in CASES])
@pytest.mark.parametrize("target,reduction,update,tau_e", SETTINGS)
def test_fused_step_matches_the_reference(c, k, views, target, reduction, update, tau_e):
    compare_step(T.fused_step, c, k, views, target, reduction, update, tau_e)


def test_ids_outside_the_bank_are_skipped():
    check_ids_outside_are_skipped(torch.ops.dps_fast.topk_step)


def test_the_loss_takes_the_kernel_on_cpu_and_the_reference_when_asked(monkeypatch):
    """DPSLoss(top_k=k) on CPU runs the kernel (the auto choice and backend='cpu'), the same
    bank as the reference backend's to the tolerance rule, with 16-bit logits too."""
    calls = []
    real = T.fused_step
    monkeypatch.setattr(T, "fused_step", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    labels = torch.randint(0, 300, (64,), generator=torch.Generator().manual_seed(2))
    crits = {b: dps_fast.DPSLoss(labels, 300, top_k=8, backend=b) for b in (None, "cpu", "reference")}
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        z, idx = torch.randn(16, 300, generator=gen) * 2, torch.randperm(64, generator=gen)[:16]
        for crit in crits.values():
            crit(z.bfloat16(), idx)
    assert len(calls) == 6, "the CPU kernel did not run for backend None and 'cpu'"
    want = crits["reference"].targets()
    for b in (None, "cpu"):
        torch.testing.assert_close(crits[b].targets(), want, rtol=1e-4, atol=1e-6)


def test_the_schema_declares_what_the_kernel_writes():
    """torch.library.opcheck's schema test: the kernel writes exactly the tensors its schema
    marks as mutated (the bank's ids, vals, rest, bound and the gradient buffer)."""
    gen = torch.Generator().manual_seed(4)
    bank = bank_state(6, 20, 3, gen)
    z = torch.randn(2, 4, 20, generator=gen)
    args = (z, torch.tensor([5, 0, 3, 1]), bank.ids, bank.vals, bank.rest, bank.bound, torch.empty_like(z), 0.9, 1.0,
            True, True, 1)
    torch.library.opcheck(torch.ops.dps_fast.topk_step.default, args, test_utils=("test_schema",))


def test_a_contrastive_term_reads_the_stepped_rows():
    """With every sample valid the step hands no rows back (the bank holds them): the
    contrastive term reads them from the bank, the same positives as with padding, where the
    stepped rows come back densified."""
    labels = torch.randint(0, 50, (32,), generator=torch.Generator().manual_seed(6))
    gen = torch.Generator().manual_seed(7)
    z, f = torch.randn(8, 50, generator=gen), torch.randn(2, 8, 4, generator=gen)
    idx = torch.randperm(32, generator=gen)[:8]
    losses = []
    for valid in (None, torch.ones(8, dtype=torch.bool)):
        crit = dps_fast.DPSLoss(labels, 50, top_k=4, contrastive_weight=0.5)
        losses.append(crit(z, idx, features=f, valid=valid))
    torch.testing.assert_close(losses[0], losses[1])


@pytest.mark.parametrize("c,k", [(10, 3), (100, 8), (33, 20)])
def test_tie_heavy_inputs_keep_the_same_classes_in_the_same_order(c, k):
    """The CPU kernel keeps the reference's K' on tie-heavy inputs (the Triton kernel and the
    float64 reference too: tests/test_topk_triton.py)."""
    check_tie_heavy(T.fused_step, c, k)


@pytest.mark.parametrize("c", [32768, 40000])
def test_rows_wider_than_int16_ids(c):
    """C = 32,768 and 40,000 (int32 ids in a bank of more than 32,767 classes)."""
    check_wide_row(T.fused_step, c)


# C with more blocks of 64 classes than nJ + k: J's candidates come from the blocks whose maximum
# reaches the floor (csrc/cpu/topk_step.cpp::LogitPool), one view; several views take the scan.
LARGE = [(5000, 16, 1), (12000, 40, 1), (5000, 16, 2)]


@pytest.mark.parametrize("c,k,views", LARGE, ids=[f"C{c}-k{k}-V{v}" for c, k, v in LARGE])
@pytest.mark.parametrize("target,reduction,update,tau_e", SETTINGS)
def test_large_rows_match_the_reference(c, k, views, target, reduction, update, tau_e):
    compare_step(T.fused_step, c, k, views, target, reduction, update, tau_e)


def test_tie_heavy_large_rows():
    """Equal logits in every block: the pool gives up (ties) and the scan keeps the reference's K'."""
    check_tie_heavy(T.fused_step, 5000, 16)


@pytest.mark.parametrize("tau_e", [1.0, 0.5])
def test_evidence_that_underflows_keeps_the_tie_rule(tau_e):
    """Five classes at 0, the rest near -200: their evidence is 0 in float32, so J's other members
    are the smallest ids among them, not the largest logits; logits near 1e4 apart (a range the
    margin does not cover) likewise. The kernel keeps the reference's K' and values."""
    c, k = 5000, 16
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(1, 3, c, generator=gen) - 200.0
    z[0, :, [7, 900, 2500, 3100, 4999]] = 0.0
    z[0, 2] = torch.randn(c, generator=gen) * 0.01
    z[0, 2, 17] = 1e4
    # K: the label and the largest ids, below the uniform level, so that J's members win their slots
    ids = torch.cat([torch.tensor([[1], [2], [3]]), torch.arange(c - 1, c - k, -1).expand(3, k - 1)], 1)
    vals = torch.cat([torch.full((3, 1), 5.0), torch.full((3, k - 1), 1e-4)], 1)
    rows = lambda: T.TopKRows(ids.clone(), vals.clone(), torch.full((3,), 1e-3 * (c - k)), c,  # noqa: E731
                              torch.zeros(3))
    fused, ref = rows(), rows()
    for _ in range(2):
        T.fused_step(z, torch.arange(3), fused, gamma=0.9, tau_e=tau_e)
        T.reference_step(z, torch.arange(3), ref, gamma=0.9, tau_e=tau_e)
        assert torch.equal(fused.ids, ref.ids)
        torch.testing.assert_close(fused.vals, ref.vals)
        torch.testing.assert_close(fused.rest, ref.rest)
    assert fused.ids[0, 6:].tolist() == [0, 2, 3, 4, 5, 6, 8, 9, 10, 11]  # zero evidence: the smallest ids


def test_a_step_past_the_last_level_cache_streams_the_same_gradient():
    """Logits and gradient over 32 MiB: the gradient goes out with streaming stores, rows aligned
    by a head of ordinary stores (C odd: every row starts at another offset); the loss, gradient
    and rows as the reference's, by the tolerance rule."""
    b, c, k = 520, 8201, 8
    gen = torch.Generator().manual_seed(3)
    bank = T.topk_prior(torch.randint(0, c, (b,), generator=gen), c, k, c=5.0, eps=1e-3)
    bank.ids = bank.ids.to(torch.int64)
    z = torch.randn(1, b, c, generator=gen) * 3
    assert z.numel() * 8 > 32 * 2 ** 20
    idx = torch.randperm(b, generator=gen)
    g = torch.tensor(0.7)
    fused, ref, exact = clone(bank), clone(bank), clone(bank, torch.float64)
    lk, gk = run(T.fused_step, z, idx, fused, g)
    le, ge = run(T.reference_step, z, idx, ref, g)
    lx, gx = run(T.reference_step, z.double(), idx, exact, g.double())
    rule_check(lk, le, lx, torch.float32, "loss")
    rule_check(gk, ge, gx, torch.float32, "grad")
    assert torch.equal(fused.ids, ref.ids)
    rule_check(fused.bound, ref.bound, exact.bound, torch.float32, "bound")


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_a_pool_compacted_while_gathering_keeps_the_reference_k(offset):
    """The first 256 classes well above the rest: the block floor comes from the other blocks, the
    pool fills within the first blocks and is compacted there, and stays in use (no ties). Logits
    offset by 1000 change nothing (the margin follows the row's range, not the logits' size)."""
    c, k = 5000, 16
    gen = torch.Generator().manual_seed(21)
    z = torch.randn(1, 4, c, generator=gen) + offset
    z[0, :, :256] = 5.0 + offset + torch.rand(4, 256, generator=gen)
    ids = torch.cat([torch.tensor([[300], [301], [302], [303]]), torch.arange(c - 1, c - k, -1).expand(4, k - 1)], 1)
    vals = torch.cat([torch.full((4, 1), 5.0), torch.full((4, k - 1), 1e-4)], 1)
    fused, ref, exact = (T.TopKRows(ids.clone(), vals.clone().to(dt), torch.full((4,), 1e-3 * (c - k), dtype=dt), c,
                                    torch.zeros(4, dtype=dt)) for dt in (torch.float32, torch.float32, torch.float64))
    g = torch.tensor(0.7)
    for _ in range(2):
        lk, gk = run(T.fused_step, z, torch.arange(4), fused, g)
        le, ge = run(T.reference_step, z, torch.arange(4), ref, g)
        lx, gx = run(T.reference_step, z.double(), torch.arange(4), exact, g.double())
        assert torch.equal(fused.ids, ref.ids)
        rule_check(lk, le, lx, torch.float32, "loss")
        rule_check(gk, ge, gx, torch.float32, "grad")
        rule_check(fused.vals, ref.vals, exact.vals, torch.float32, "values")
    assert (fused.ids[:, 1:] < 256).all()  # J came from the first blocks

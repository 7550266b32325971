"""The top-k bank's reference step (docs/method.md §12, issue 26) against a densified float64
computation of the same maths: the new ids, values and rest, the mass, the target, the loss
and its gradient; the prior; the tie rule; non-finite rows; the error bound against a dense
bank."""
import pytest
import torch

import dps_fast
from dps_fast import topk as T


def dense_step(dense, p, gamma, k):
    """The dense computation of §12's maths: the top-k (ties to the smaller class id) of
    gamma * a + p over all C, the rest the mass outside it."""
    b = gamma * dense + p
    cls = torch.arange(dense.shape[1]).expand_as(b)
    keep = T.top_by_value(b, cls, k)
    K = cls.gather(1, keep)
    vals = b.gather(1, keep)
    rest = b.sum(1) - vals.sum(1)
    return K, vals, rest


def random_bank(n, c, k, gen, dtype=torch.float64):
    """A reachable top-k state: a prior stepped a few times with random evidence."""
    bank = T.topk_prior(torch.randint(0, c, (n,), generator=gen), c, k, c=5.0, eps=0.05, dtype=dtype)
    for _ in range(3):
        z = torch.randn(n, c, generator=gen, dtype=dtype) * 3
        T.reference_step(z, torch.arange(n), bank, gamma=0.9)
    return bank


@pytest.mark.parametrize("c,k", [(2, 1), (5, 1), (5, 4), (10, 3), (100, 8), (1000, 32), (33, 20)])
@pytest.mark.parametrize("views", [1, 3])
def test_update_is_the_top_k_of_the_implied_dense_update(c, k, views):
    gen = torch.Generator().manual_seed(c * 10 + k + views)
    n = 7
    bank = random_bank(n, c, k, gen)
    dense = T.densify(bank.ids, bank.vals, bank.rest, c)
    z = torch.randn(views, n, c, generator=gen, dtype=torch.float64) * 2
    p, _ = T.evidence(z, 1.0)
    want_K, want_vals, want_rest = dense_step(dense, p, 0.9, k)
    K, b, rest = T.topk_update(bank.ids, bank.vals, bank.rest, p, 0.9)
    # the same set of classes with the same values (order within a row is free)
    for r in range(n):
        got = dict(zip(K[r].tolist(), b[r].tolist()))
        want = dict(zip(want_K[r].tolist(), want_vals[r].tolist()))
        assert got.keys() == want.keys()
        for key in got:
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12)
    torch.testing.assert_close(rest, want_rest, rtol=1e-12, atol=1e-12)
    mass = bank.vals.sum(1) + bank.rest
    torch.testing.assert_close(b.sum(1) + rest, 0.9 * mass + 1, rtol=1e-12, atol=1e-12)
    assert bool((rest >= 0).all())


@pytest.mark.parametrize("target", ["posterior", "prior"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_loss_and_gradient_match_the_dense_target(target, reduction):
    gen = torch.Generator().manual_seed(7)
    n, c, k = 6, 50, 5
    bank = random_bank(n, c, k, gen)
    before = T.densify(bank.ids, bank.vals, bank.rest, c)
    z = (torch.randn(2, 4, c, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    idx = torch.tensor([4, 0, 5, 2])
    loss = T.reference_step(z, idx, bank, gamma=0.8, target=target, reduction=reduction)
    after = T.densify(bank.ids, bank.vals, bank.rest, c)
    a = (after if target == "posterior" else before)[idx]
    t = a / a.sum(1, keepdim=True)
    zd = z.detach().clone().requires_grad_()
    want = -(t * torch.log_softmax(zd, -1)).sum(-1)
    want = want.mean() if reduction == "mean" else want.sum() if reduction == "sum" else want
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    g = torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5  # a non-unit upstream gradient
    (loss * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(z.grad, zd.grad, rtol=1e-12, atol=1e-12)
    untouched = torch.tensor([1, 3])
    torch.testing.assert_close(after[untouched], before[untouched], rtol=0, atol=0)


def test_prior_is_the_dense_prior():
    labels = torch.tensor([0, 3, 9, 5])
    bank = T.topk_prior(labels, 10, 4, dtype=torch.float64)
    dense = dps_fast.init_prior(labels, 10, dtype=torch.float64)
    torch.testing.assert_close(T.densify(bank.ids, bank.vals, bank.rest, 10), dense, rtol=1e-15, atol=0)
    assert bool((bank.ids[:, 0] == labels).all()) and len(set(bank.ids[1].tolist())) == 4


def test_ties_go_to_the_smaller_class_id():
    """Uniform evidence on a uniform row: every candidate ties; K' is the k smallest ids, and
    within K, an id already kept beats an equal newcomer of larger id."""
    c, k = 12, 3
    bank = T.TopKRows(torch.tensor([[7, 2, 9]]), torch.full((1, 3), 1.0, dtype=torch.float64),
                      torch.tensor([9.0], dtype=torch.float64), c)
    p = torch.full((1, c), 1.0 / c, dtype=torch.float64)
    K, b, rest = T.topk_update(bank.ids, bank.vals, bank.rest, p, 0.5)
    assert sorted(K[0].tolist()) == [0, 1, 2]
    torch.testing.assert_close(b.sum(1) + rest, torch.tensor([0.5 * 12 + 1], dtype=torch.float64))


def test_non_finite_rows_and_eval_keep_their_state():
    gen = torch.Generator().manual_seed(3)
    bank = random_bank(5, 20, 4, gen)
    saved = (bank.ids.clone(), bank.vals.clone(), bank.rest.clone())
    z = torch.randn(3, 20, generator=gen, dtype=torch.float64).requires_grad_()
    with torch.no_grad():
        z[1, 4] = float("nan")
    loss = T.reference_step(z, torch.tensor([0, 1, 2]), bank, reduction="none", update=False)
    assert torch.equal(bank.ids, saved[0]) and torch.equal(bank.vals, saved[1]) and torch.equal(bank.rest, saved[2])
    loss = T.reference_step(z, torch.tensor([0, 1, 2]), bank, reduction="none")
    assert torch.isnan(loss[1]) and bool(torch.isfinite(loss[[0, 2]]).all())
    assert torch.equal(bank.ids[1], saved[0][1]) and torch.equal(bank.vals[1], saved[1][1])
    loss.nansum().backward()
    assert bool(torch.isnan(z.grad[1]).all()) and bool(torch.isfinite(z.grad[[0, 2]]).all())


def test_l1_error_against_the_dense_bank_obeys_its_bound():
    """||a - a~||_1 <= gamma * (the same before) + delta, with delta <= 2 * (the step's evidence
    mass outside K' + the dropped entries' excess over the uniform level), step after step."""
    gen = torch.Generator().manual_seed(11)
    n, c, k, gamma = 16, 40, 4, 0.9
    labels = torch.randint(0, c, (n,), generator=gen)
    bank = T.topk_prior(labels, c, k, dtype=torch.float64)
    dense = dps_fast.init_prior(labels, c, dtype=torch.float64)
    err = torch.zeros(n, dtype=torch.float64)
    for _ in range(25):
        z = torch.randn(n, c, generator=gen, dtype=torch.float64) * 2 + 3 * torch.nn.functional.one_hot(labels, c)
        p, _ = T.evidence(z, 1.0)
        K, b, rest = T.topk_update(bank.ids, bank.vals, bank.rest, p, gamma)
        implied_update = gamma * T.densify(bank.ids, bank.vals, bank.rest, c) + p
        kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, K, True)
        level = rest / (c - k)
        excess = (torch.where(kept, 0.0, implied_update) - level[:, None]).clamp_min(0).sum(1)
        delta = 2 * ((p * ~kept).sum(1) + excess)
        T.reference_step(z, torch.arange(n), bank, gamma=gamma)
        dense = gamma * dense + p
        new_err = (dense - T.densify(bank.ids, bank.vals, bank.rest, c)).abs().sum(1)
        assert bool((new_err <= gamma * err + delta + 1e-9).all())
        err = new_err


def test_bad_k_is_refused():
    for k in (0, 10, 11, True):
        with pytest.raises(ValueError, match="top_k must be an int in"):
            T.topk_prior(torch.tensor([1]), 10, k)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_positions_is_the_sorted_selection_with_the_tie_rule(k):
    """The O(C) selection of J picks what the stable sort picks, ties included (values from a
    small set, so most rows tie at the k-th value)."""
    gen = torch.Generator().manual_seed(k)
    values = torch.randint(0, 4, (50, 19), generator=gen).double()
    values[:5] = float("-inf")
    values[:5, :k + 2] = 1.0
    cls = torch.arange(19).expand(50, -1)
    want = torch.sort(T.top_by_value(values, cls, k), 1).values
    got = torch.sort(T.top_positions(values, k), 1).values
    assert torch.equal(got, want)

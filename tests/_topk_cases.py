"""Helpers of the top-k kernel tests (test_topk_kernel.py: CPU; test_topk_triton.py: Triton)."""
import torch

from dps_fast import topk as T
from _helpers import rule_check


def bank_state(n, c, k, gen):
    bank = T.topk_prior(torch.randint(0, c, (n,), generator=gen), c, k, c=5.0, eps=0.05)
    for _ in range(2):
        T.reference_step(torch.randn(n, c, generator=gen) * 3, torch.arange(n), bank, gamma=0.9)
    bank.ids = bank.ids.to(torch.int64)
    return bank


def clone(bank, dtype=None):
    cast = (lambda t: t.clone()) if dtype is None else (lambda t: t.to(dtype))
    return T.TopKRows(bank.ids.clone(), cast(bank.vals), cast(bank.rest), bank.num_classes, cast(bank.bound))


def run(step, z, idx, bank, g, **kw):
    x = z.clone().requires_grad_(True)
    loss = step(x, idx, bank, **kw)
    (loss * g).sum().backward()
    return loss.detach(), x.grad


def same_rows(got, want, rows, what):
    for r in rows.tolist():
        assert set(got.ids[r].tolist()) == set(want.ids[r].tolist()), f"{what}: row {r} kept other classes"
    order = lambda b: b.ids.argsort(1)  # noqa: E731 - compare values class by class
    return (got.vals.gather(1, order(got)), want.vals.gather(1, order(want)))


def check_rows(fused, ref, exact, bank, idx):
    """The rows a kernel wrote (idx = [9, 0, 4, 11, 2, 7, 5], position 2 the NaN row) against the
    float32 and float64 references by the tolerance rule; the rows it did not touch unchanged."""
    touched = idx[torch.tensor([0, 1, 3, 4, 5, 6])]
    vk, vx = same_rows(fused, exact, touched, "kernel")
    rule_check(vk, same_rows(ref, exact, touched, "reference")[0], vx, torch.float32, "values")
    rule_check(fused.rest, ref.rest, exact.rest, torch.float32, "rest")
    rule_check(fused.bound, ref.bound, exact.bound, torch.float32, "bound")
    untouched = torch.tensor([1, 3, 6, 8, 10, 4])  # 4 holds the NaN row
    for name in ("ids", "vals", "rest", "bound"):
        assert torch.equal(getattr(fused, name)[untouched], getattr(bank, name)[untouched]), name


SETTINGS = [("posterior", "mean", True, 1.0), ("prior", "none", True, 0.5), ("posterior", "sum", False, 2.0)]


def on(device, bank):
    """A copy of ``bank`` on ``device``."""
    return T.TopKRows(*(t.to(device, copy=True) for t in (bank.ids, bank.vals, bank.rest)), bank.num_classes,
                      bank.bound.to(device, copy=True))


def compare_step(step, c, k, views, target, reduction, update, tau_e, device="cpu"):
    """A fused step (``step``, dps_fast/topk.py::fused_step's signature) on ``device`` against the
    float32 and float64 reference steps: 12 rows, a batch of 7 with a NaN row, a non-unit upstream
    gradient; loss, gradient and rows by the tolerance rule, untouched rows unchanged."""
    gen = torch.Generator().manual_seed(c + k + views)
    bank = bank_state(12, c, k, gen)
    z = torch.randn(views, 7, c, generator=gen) * 3
    z[:, 2, 3 % c] = float("nan")  # a row with a non-finite logit keeps its state
    idx = torch.tensor([9, 0, 4, 11, 2, 7, 5])
    shape = (views, 7) if reduction == "none" else ()
    g = torch.rand(shape, generator=gen) + 0.5 if shape else torch.tensor(0.7)
    kw = dict(gamma=0.85, tau_e=tau_e, target=target, reduction=reduction, update=update)
    fused, ref, exact = on(device, bank), clone(bank), clone(bank, torch.float64)
    lk, gk = run(step, z.to(device), idx.to(device), fused, g.to(device), **kw)
    le, ge = run(T.reference_step, z, idx, ref, g, **kw)
    lx, gx = run(T.reference_step, z.double(), idx, exact, g.double(), **kw)
    rule_check(lk.cpu(), le, lx, torch.float32, "loss")
    rule_check(gk.cpu(), ge, gx, torch.float32, "grad")
    check_rows(on("cpu", fused), ref, exact, bank, idx)


def check_ids_outside_are_skipped(op, device="cpu"):
    """``op`` (dps_fast::topk_step's signature) with ids -1 and N in the batch: their loss and
    gradient NaN, their rows (and every row the batch does not hold) untouched."""
    gen = torch.Generator().manual_seed(1)
    bank = bank_state(5, 40, 4, gen)
    fused = on(device, bank)
    z = torch.randn(1, 3, 40, generator=gen).to(device)
    grad = torch.empty_like(z)
    loss = op(z, torch.tensor([-1, 2, 5], device=device), fused.ids, fused.vals, fused.rest, fused.bound, grad, 0.9,
              1.0, True, True, 0).cpu()
    grad = grad.cpu()
    assert torch.isnan(loss[0, [0, 2]]).all() and torch.isfinite(loss[0, 1])
    assert torch.isnan(grad[0, [0, 2]]).all() and torch.isfinite(grad[0, 1]).all()
    keep, vals = torch.tensor([0, 1, 3, 4]), fused.vals.cpu()
    assert torch.equal(vals[keep], bank.vals[keep]) and not torch.equal(vals[2], bank.vals[2])


def check_tie_heavy(step, c, k, steps=4):
    """Equal logits on a fresh prior, step after step (the slots' values and the level equal in
    exact arithmetic, rounded along different paths after the first step): ``step`` keeps the
    float32 reference's K', in its order, ties to the smaller class id (docs/method.md §12)."""
    labels = torch.tensor([0, c - 1, c // 2, 1])
    for z in (torch.zeros(1, 4, c), torch.full((2, 4, c), 3.0)):
        fused, ref = (T.topk_prior(labels, c, k, c=2.0, eps=0.25) for _ in range(2))
        fused.ids = fused.ids.to(torch.int64)
        for _ in range(steps):
            step(z, torch.arange(4), fused, gamma=0.9)
            T.reference_step(z, torch.arange(4), ref, gamma=0.9)
            assert torch.equal(fused.ids, ref.ids.to(torch.int64))
            assert torch.equal(fused.ids[:, 1:], torch.sort(fused.ids[:, 1:], 1).values)  # ties: smaller ids first


def check_wide_row(step, c, device="cpu", k=3):
    """A row of C >= 32,768 classes (more than int16 ids hold: int32 in a bank): the same K',
    values, loss and gradient as the reference, by the tolerance rule."""
    gen = torch.Generator().manual_seed(5)
    bank = T.topk_prior(torch.tensor([0, c - 1, 4]), c, k, c=5.0, eps=1e-3)
    bank.ids = bank.ids.to(torch.int64)
    z = torch.randn(1, 3, c, generator=gen) * 4
    fused, ref, exact = on(device, bank), clone(bank), clone(bank, torch.float64)
    idx = torch.tensor([2, 0, 1])
    lk, gk = run(step, z.to(device), idx.to(device), fused, torch.tensor(1.0, device=device))
    le, ge = run(T.reference_step, z, idx, ref, torch.tensor(1.0))
    lx, gx = run(T.reference_step, z.double(), idx, exact, torch.tensor(1.0, dtype=torch.float64))
    rule_check(lk.cpu(), le, lx, torch.float32, "loss")
    rule_check(gk.cpu(), ge, gx, torch.float32, "grad")
    assert torch.equal(fused.ids.cpu(), ref.ids)
    rule_check(fused.vals.cpu(), ref.vals, exact.vals, torch.float32, "values")

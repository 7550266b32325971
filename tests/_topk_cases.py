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

"""Each launch plan of the Triton DPS / soft-CE kernels (dps_fast/kernels/dps_cross_entropy.py:
resident, loop, split; docs/performance.md, "GPU kernels: bytes by design") against the
reference by the tolerance rule, with the plan forced: the launcher picks a plan by shape, and
under the interpreter it takes the loop only beyond 8,192 columns over the views and the split
never. Odd C, several views (VP > V), tau_e != 1, both targets, every reduction, a
non-unit upstream gradient, 16-bit logits and bank, non-finite rows, ids outside the bank, a
partial last chunk and row block, and untouched bank rows."""
import pytest
import torch
import triton

import dps_fast
from _helpers import FUSED, rule_check

TRITON = [c for c in FUSED if c[0] == "triton"]
pytestmark = pytest.mark.skipif(not TRITON, reason="Triton is not available (nor its interpreter)")
DEVICE = TRITON[0][1] if TRITON else "cpu"


def plans(c):
    """Every plan at C = c, with small blocks so that loops take several trips."""
    from dps_fast.kernels.dps_cross_entropy import Plan
    return {
        "resident": Plan("resident", 2, triton.next_power_of_2(max(c, 16)), 4),
        "loop": Plan("loop", 2, 64, 4),
        "split": Plan("split", 2, 32, 4, chunk=64, chunks=triton.cdiv(c, 64)),
    }


SHAPES = [(1, 3, 1), (37, 5, 2), (300, 9, 3), (1000, 4, 1)]
SETTINGS = [("none", "posterior", 1.0), ("mean", "prior", 2.0), ("sum", "posterior", 0.5)]


def forced(monkeypatch, plan):
    from dps_fast.kernels import dps_cross_entropy as K
    monkeypatch.setattr(K, "_plan", lambda b, c, v: plan)


def run(backend, z, idx, alpha, red, g, **kw):
    a = alpha.clone()
    x = z.clone().requires_grad_(True)
    loss = dps_fast.dps_cross_entropy(x, idx, a, reduction=red, backend=backend, validate=False, **kw)
    (loss * g).sum().backward()
    return loss.detach(), x.grad, a


def inputs(c, b, v, zdt, adt, gen):
    n = 2 * b + 3
    alpha = dps_fast.init_prior(torch.randint(0, c, (n,), generator=gen), c, c=5.0, eps=0.05, dtype=torch.float64)
    alpha = (alpha + torch.rand(n, c, generator=gen, dtype=torch.float64)).to(adt)
    z = (torch.randn((v, b, c) if v > 1 else (b, c), generator=gen) * 3).to(zdt)
    if b > 2:  # a non-finite row: NaN in one view, inf in the next row
        z.view(-1, b, c)[-1, 0, c // 2] = float("nan")
        z.view(-1, b, c)[0, 1, 0] = float("inf")
    idx = torch.randperm(n, generator=gen)[:b]
    if b > 3:
        idx[2] = n + 5  # outside the bank (validate=False): loss NaN, nothing written
    return z.to(DEVICE), idx.to(DEVICE), alpha.to(DEVICE)


@pytest.mark.parametrize("kind", ["resident", "loop", "split"])
@pytest.mark.parametrize("c,b,v", SHAPES, ids=[f"C{c}-B{b}-V{v}" for c, b, v in SHAPES])
@pytest.mark.parametrize("zdt,adt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "bf16"])
def test_each_plan_matches_the_reference(monkeypatch, kind, c, b, v, zdt, adt):
    gen = torch.Generator().manual_seed(c * 100 + b * 10 + v)
    z, idx, alpha = inputs(c, b, v, zdt, adt, gen)
    untouched = torch.ones(alpha.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[idx[idx < alpha.shape[0]]] = False
    if b > 3:
        untouched[:] = True  # rows of refused samples stay as they were too
        untouched[idx[3:]] = False
    forced(monkeypatch, plans(c)[kind])
    for red, target, tau_e in SETTINGS:
        g = (torch.rand(z.shape[:-1], generator=gen) + 0.5).to(DEVICE) if red == "none" else \
            torch.tensor(0.7, device=DEVICE)
        kw = dict(gamma=0.9, tau_e=tau_e, target=target)
        lk, gk, ak = run("triton", z, idx, alpha, red, g, **kw)
        le, ge, ae = run("reference", z, idx, alpha, red, g, **kw)
        lx, gx, ax = run("reference", z.double(), idx, alpha.double(), red, g.double(), **kw)
        what = f"{kind} ({red}, {target}, tau_e {tau_e})"
        rule_check(lk, le, lx, torch.float32, f"loss {what}", scale=float(b * v) if red == "sum" else None)
        rule_check(gk, ge, gx, zdt, f"grad {what}")
        rule_check(ak, ae, ax, adt, f"bank {what}")
        assert torch.equal(ak[untouched], alpha[untouched]), f"{what}: a row outside the step changed"


@pytest.mark.parametrize("kind", ["resident", "loop", "split"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalised", "as-is"])
def test_each_plan_of_the_soft_target_ce(monkeypatch, kind, normalize):
    gen = torch.Generator().manual_seed(7)
    c, b = 300, 6
    z = (torch.randn(b, c, generator=gen) * 2).to(DEVICE)
    t = (torch.rand(b, c, generator=gen) * (2.0 if not normalize else 1.0)).to(DEVICE)
    forced(monkeypatch, plans(c)[kind])

    def soft(backend, x, target):
        x = x.clone().requires_grad_(True)
        loss = dps_fast.soft_cross_entropy(x, target, reduction="none", normalize=normalize, backend=backend)
        (loss * torch.linspace(0.5, 1.5, loss.numel(), device=x.device).view_as(loss)).sum().backward()
        return loss.detach(), x.grad
    lk, gk = soft("triton", z, t)
    le, ge = soft("reference", z, t)
    lx, gx = soft("reference", z.double(), t.double())
    rule_check(lk, le, lx, torch.float32, f"soft-CE loss ({kind})")
    rule_check(gk, ge, gx, torch.float32, f"soft-CE grad ({kind})")


def test_the_launcher_picks_each_plan_by_shape():
    """On a GPU (not the interpreter): resident up to 8,192 columns over the views, a 2-D split of
    large C when rows alone would leave SMs idle, the row loop otherwise."""
    from dps_fast.kernels import dps_cross_entropy as K

    def plan(b, c, v):
        return K._plan(b, c, v, interpret=False)
    assert plan(65536, 100, 2).kind == "resident"
    assert plan(65536, 8192, 1).kind == "resident" and plan(65536, 4097, 2).kind == "loop"
    for b, c, v in ((256, 32000, 1), (1, 131072, 2), (500, 8193, 1)):
        split = plan(b, c, v)
        assert split.kind == "split" and split.chunk % split.block_c == 0, (b, c, v, split)
        assert split.chunks * split.chunk >= c > (split.chunks - 1) * split.chunk, (b, c, v, split)
    assert plan(256, 32000, 1).chunks * 256 >= K.MIN_PROGRAMS
    assert plan(8192, 32000, 1).kind == "loop"

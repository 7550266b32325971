"""Fused soft-target cross-entropy against the reference and F.cross_entropy."""
import pytest
import torch
import torch.nn.functional as F

import dps_fast
from _helpers import FUSED, case_id, rule_check

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (7, 2), (256, 10), (7, 1023), (256, 1000), (3, 32773)]


def run(backend, z, t, red, g, normalize):
    x = z.clone().requires_grad_(True)
    loss = dps_fast.soft_cross_entropy(x, t, reduction=red, normalize=normalize, backend=backend)
    (loss * g).sum().backward()
    return loss.detach(), x.grad


CASES = [(c, s, dt, tdt) for c in FUSED for s in SHAPES for dt in DTYPES for tdt in (torch.float32, torch.bfloat16)
         if not (c == ("triton", "cpu") and s[0] * s[1] > 300_000)]


@pytest.mark.parametrize("case,shape,zdt,tdt", CASES,
                         ids=[f"{case_id(c)}-B{s[0]}-C{s[1]}-{str(d)[6:]}-t_{str(t)[6:]}" for c, s, d, t in CASES])
def test_soft_ce_matches_reference(case, shape, zdt, tdt):
    backend, device = case
    b, c = shape
    gen = torch.Generator().manual_seed(b * 7 + c)
    z = (torch.randn(b, c, generator=gen) * 3).to(zdt).to(device)
    raw = torch.rand(b, c, generator=gen) * 2
    for red, normalize in (("none", True), ("mean", False), ("sum", True)):
        t = (raw if normalize else raw / raw.sum(1, keepdim=True)).to(tdt).to(device)
        g = (torch.rand(b, generator=gen) + 0.5).to(device) if red == "none" else torch.tensor(1.3, device=device)
        lk, gk = run(backend, z, t, red, g, normalize)
        le, ge = run("reference", z, t, red, g, normalize)
        lx, gx = run("reference", z.double(), t.double(), red, g.double(), normalize)
        assert gk.dtype == zdt and lk.dtype == torch.float32
        rule_check(lk, le, lx, torch.float32, f"loss {red}", scale=float(b) if red == "sum" else None)
        rule_check(gk, ge, gx, zdt, f"grad {red}")


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_soft_ce_equals_torch_cross_entropy(case):
    backend, device = case
    torch.manual_seed(0)
    z = torch.randn(33, 17, device=device, requires_grad=True)
    t = torch.softmax(torch.randn(33, 17, device=device), -1)
    got = dps_fast.soft_cross_entropy(z, t, backend=backend)
    want = F.cross_entropy(z, t)
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(got, z)
    (g2,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(g1, g2)

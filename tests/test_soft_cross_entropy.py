"""Fused soft-target cross-entropy against the reference and F.cross_entropy (docs/method.md §3)."""
import pytest
import torch
import torch.nn.functional as F

import dps_fast
from _helpers import ALL_BACKENDS, FUSED, case_id, rule_check

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
    # normalize=True here; rows of any mass without it: test_soft_ce_rows_of_any_mass_match_torch
    for red, normalize in (("none", True), ("mean", True), ("sum", True)):
        t = raw.to(tdt).to(device)
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


# ---------------------------------------------------------------- PyTorch's definition (issue #11)
def _torch_ce_run(z, t, red, g, weight=None):
    x = z.clone().requires_grad_(True)
    loss = F.cross_entropy(x, t, weight=weight, reduction=red)
    (loss * g).sum().backward()
    return loss.detach(), x.grad


MASSES = (0.0, 0.3, 1.0, 7.0)


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
@pytest.mark.parametrize("shape", [(4, 1), (8, 10), (8, 1000), (4, 32773)], ids=lambda s: f"B{s[0]}-C{s[1]}")
@pytest.mark.parametrize("zdt", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_soft_ce_rows_of_any_mass_match_torch(case, shape, zdt):
    """Rows summing to 0, 0.3, 1 and 7: loss s_b * lse - <t, z>, gradient s_b * softmax - t,
    by the tolerance rule against F.cross_entropy (eager at the logits' dtype, exact in fp64)."""
    backend, device = case
    b, c = shape
    gen = torch.Generator().manual_seed(b * 31 + c)
    z = (torch.randn(b, c, generator=gen) * 3).to(zdt)
    raw = torch.rand(b, c, generator=gen) + 0.01
    mass = torch.tensor([MASSES[i % len(MASSES)] for i in range(b)])
    t = raw / raw.sum(1, keepdim=True) * mass[:, None]
    assert torch.allclose(t.sum(1), mass)
    for red in ("none", "mean", "sum"):
        g = (torch.rand(b, generator=gen) + 0.5) if red == "none" else torch.tensor(1.3)
        lk, gk = run(backend, z.to(device), t.to(device), red, g.to(device), False)
        le, ge = _torch_ce_run(z, t.to(zdt), red, g.to(zdt) if red == "none" else g)
        lx, gx = _torch_ce_run(z.double(), t.double(), red, g.double())
        rule_check(lk.cpu(), le.float(), lx, torch.float32, f"loss {red}", scale=float(b) * 7 if red == "sum" else None)
        rule_check(gk.cpu(), ge, gx, zdt, f"grad {red}")
        # normalize=True is cross-entropy against t / s_b (a row of mass 0 has no target: NaN)
        lk, gk = run(backend, z.to(device), t.to(device), "none", g.to(device) if red == "none" else
                     torch.ones(b, device=device), True)
        lx, _ = _torch_ce_run(z.double(), t.double() / t.double().sum(1, keepdim=True), "none", 1.0)
        assert torch.equal(torch.isnan(lk.cpu()), mass == 0)
        keep = mass > 0
        torch.testing.assert_close(lk.cpu()[keep].double(), lx[keep], rtol=2e-2 if zdt != torch.float32 else 1e-5,
                                   atol=1e-5 * c)


def _opinfo_probability_samples():
    """PyTorch's own OpInfo samples for F.cross_entropy whose target is a probability
    tensor of the input's shape (targets in [0, 1), rows not summing to 1, K-dim inputs,
    class weights, every reduction)."""
    from torch.testing._internal.common_methods_invocations import op_db

    (info,) = [o for o in op_db if o.name == "nn.functional.cross_entropy"]
    samples = [s for s in info.sample_inputs("cpu", torch.float32)
               if s.args[0].is_floating_point() and s.args[0].shape == s.input.shape]
    assert len(samples) >= 10, "OpInfo samples for probability targets not found"
    return samples


def _as_rows(x):
    """[N, C, d1, ...] -> [N * d1 * ..., C] (class dimension last), [N, C] unchanged."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
def test_soft_ce_on_pytorch_opinfo_samples(case):
    """soft_cross_entropy equals F.cross_entropy, loss and gradient, on every OpInfo sample with
    probability targets. A class weight w is cross-entropy against w * t (the loss is linear in
    the target; PyTorch's mean for probability targets divides by the row count, as ours does)."""
    backend, device = case
    for k, s in enumerate(_opinfo_probability_samples()):
        red = s.kwargs.get("reduction", "mean")
        w = s.kwargs.get("weight")
        t = s.args[0].detach()
        want_x = s.input.detach().clone().requires_grad_(True)
        want = F.cross_entropy(want_x, t, weight=w, reduction=red)
        rows_t = _as_rows(t * (w.view(-1, *[1] * (t.dim() - 2)) if w is not None else 1))
        got_x = s.input.detach().clone().to(device).requires_grad_(True)
        got = dps_fast.soft_cross_entropy(_as_rows(got_x), rows_t.to(device), reduction=red, backend=backend)
        if red == "none":
            got = got.reshape(want.shape)
        g = torch.rand(want.shape, generator=torch.Generator().manual_seed(k)) + 0.5
        (want * g).sum().backward()
        (got * g.to(device)).sum().backward()
        msg = f"sample {k}: input {list(s.input.shape)}, {s.kwargs}"
        torch.testing.assert_close(got.cpu(), want.detach(), msg=msg)
        torch.testing.assert_close(got_x.grad.cpu(), want_x.grad, msg=msg)

"""The CUDA kernels (csrc/cuda/*.cu) run on the CPU by tools/cuda_emulator against the
reference, by the tolerance rule: the DPS step (registers up to 8 views, global scratch
beyond), soft-target CE of any row mass (docs/method.md §3), huge finite logits
(docs/method.md §9), SupCon below and above 1024 feature dimensions. This checks the
kernels' arithmetic and indexing without a GPU; the GPU run (tests with a CUDA device)
checks the rest (see tests/_cuda_emu.py for what emulation cannot show)."""
import pytest
import torch
import torch.nn.functional as F

import dps_fast
from dps_fast import _registration
from dps_fast import reference as R
from _helpers import rule_check

E = pytest.importorskip("_cuda_emu")
if E.unavailable():
    pytest.skip(f"CUDA emulator: {E.unavailable()}", allow_module_level=True)

RED = {"none": 0, "mean": 1, "sum": 2}


def _upstream(shape, red, gen):
    return torch.rand(shape, generator=gen) + 0.5 if red == "none" else torch.tensor(0.7)


def emu_dps(z, idx, alpha, red, g, target="posterior", gamma=0.9, tau_e=1.0):
    """The emulated fused op as the public API uses it: loss, d(sum(loss * g))/dz, the bank."""
    a = alpha.clone()
    grad = torch.empty_like(z)
    loss = E.dps_ce_fwd(z, idx, a, grad, gamma, tau_e, target == "posterior", True, RED[red])
    return loss, (grad.float() * (g[..., None] if red == "none" else g)).to(z.dtype), a


def ref_dps(z, idx, alpha, red, g, target="posterior", gamma=0.9, tau_e=1.0):
    a = alpha.clone()
    x = z.clone().requires_grad_(True)
    loss = R.dps_cross_entropy(x, idx, a, gamma, tau_e, target, red)
    (loss * g).sum().backward()
    return loss.detach(), x.grad, a


# V <= 2 and C <= 4096 take the resident kernel, at each (threads a row, columns a thread):
# (8, 4) C 1 and 10, (8, 16) C 50, (32, 4) C 100, (32, 16) C 300, (256, 4) C 700, (256, 16) C 3000
# and 4096, the widest; C 4097 is streamed. Else the streaming kernel: C picks the threads per
# row (8 / 32 / 256), V the register views (4, 8); V > 8 takes the many-views kernel.
RESIDENT_EDGES = [(50, 13, 2), (300, 9, 1), (700, 4, 2), (4096, 3, 1), (4097, 3, 1), (10, 20, 3), (300, 9, 3)]
DPS_CASES = [(c, b, v, zdt, adt) for c, b, v in [(1, 7, 1), (10, 37, 2), (100, 37, 1), (1000, 9, 3), (3000, 5, 2),
                                                 (100, 11, 5), (10, 37, 9), (1000, 5, 12), (3000, 3, 17)]
             + RESIDENT_EDGES
             for zdt, adt in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                              (torch.float16, torch.float32)]]


@pytest.mark.parametrize("c,b,v,zdt,adt", DPS_CASES,
                         ids=[f"C{c}-B{b}-V{v}-{str(z)[6:]}-bank_{str(a)[6:]}" for c, b, v, z, a in DPS_CASES])
def test_emulated_cuda_dps_matches_reference(c, b, v, zdt, adt):
    gen = torch.Generator().manual_seed(c * 100 + b * 10 + v)
    n = 2 * b + 3
    alpha = dps_fast.init_prior(torch.randint(0, c, (n,), generator=gen), c, c=5.0, eps=0.05, dtype=adt)
    alpha += (torch.rand(n, c, generator=gen) * 0.5).to(adt)
    z = (torch.randn(v, b, c, generator=gen) * 3).to(zdt)
    idx = torch.randperm(n, generator=gen)[:b]
    tau_e = 2.0 if v % 2 else 1.0
    for red, target in (("none", "posterior"), ("mean", "prior"), ("sum", "posterior")):
        g = _upstream((v, b), red, gen)
        lk, gk, ak = emu_dps(z, idx, alpha, red, g, target, tau_e=tau_e)
        le, ge, ae = ref_dps(z, idx, alpha, red, g, target, tau_e=tau_e)
        lx, gx, ax = ref_dps(z.double(), idx, alpha.double(), red, g.double(), target, tau_e=tau_e)
        rule_check(lk, le, lx, torch.float32, f"loss ({red}, {target})", scale=float(b * v) if red == "sum" else None)
        rule_check(gk, ge, gx, zdt, f"grad ({red}, {target})")
        rule_check(ak, ae, ax, adt, f"bank ({red}, {target})")
        untouched = torch.ones(n, dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(ak[untouched], alpha[untouched])


@pytest.mark.parametrize("c,v", [(10, 1), (300, 2), (3000, 1), (5000, 2)])
def test_emulated_cuda_refused_rows_write_nothing(c, v):
    """A row with a NaN or an inf logit, or an id outside the bank (no validation), gets NaN loss
    and gradient and leaves its bank row as it was; the other rows match the reference."""
    gen = torch.Generator().manual_seed(c + v)
    n, b = 12, 5
    alpha = torch.rand(n, c, generator=gen) + 0.1
    z = torch.randn(v, b, c, generator=gen) * 2
    z[v - 1, 0, c // 2] = float("nan")
    z[0, 1, c - 1] = float("inf")
    idx = torch.tensor([3, 7, n + 4, 0, 9])
    g = _upstream((v, b), "none", gen)
    lk, gk, ak = emu_dps(z, idx, alpha, "none", g, tau_e=2.0)
    assert torch.isnan(lk[:, :3]).all() and torch.isfinite(lk[:, 3:]).all()
    assert torch.isnan(gk[:, :3]).all() and torch.isfinite(gk[:, 3:]).all()
    changed = torch.zeros(n, dtype=torch.bool)
    changed[[0, 9]] = True
    assert torch.equal(ak[~changed], alpha[~changed])
    keep = torch.tensor([3, 4])
    le, ge, ae = ref_dps(z[:, keep], idx[keep], alpha, "none", g[:, keep], tau_e=2.0)
    lx, gx, ax = ref_dps(z[:, keep].double(), idx[keep], alpha.double(), "none", g[:, keep].double(), tau_e=2.0)
    rule_check(lk[:, keep], le, lx, torch.float32, "loss")
    rule_check(gk[:, keep], ge, gx, torch.float32, "grad")
    rule_check(ak, ae, ax, torch.float32, "bank")


@pytest.mark.parametrize("c,v", [(100, 1), (300, 2), (4096, 1)])
def test_emulated_cuda_resident_rows_move_the_same_values_wide_or_not(c, v):
    """The resident kernel moves a group of four columns in one access only where the row is
    aligned (C a multiple of 4, every pointer on 4 elements); logits, bank and gradient one
    element off that alignment take the element-wise path: the same values, bit for bit."""
    gen = torch.Generator().manual_seed(c * v)
    n, b = 9, 6
    z = torch.randn(v, b, c, generator=gen) * 2
    alpha = torch.rand(n, c, generator=gen) + 0.1
    idx = torch.tensor([4, 0, 7, 2, 8, 5])

    def offset(t):  # the same values, one element into a fresh buffer: 4 bytes off 16-byte alignment
        buf = torch.empty(t.numel() + 1)
        buf[1:] = t.reshape(-1)
        return buf[1:].view(t.shape)
    for red in ("none", "mean"):
        outs = []
        for place in (lambda t: t.clone(), offset):
            a, grad = place(alpha), place(torch.empty_like(z))
            outs.append((E.dps_ce_fwd(place(z), idx, a, grad, 0.9, 2.0, True, True, RED[red]), grad, a))
        for x, y, what in zip(outs[0], outs[1], ("loss", "gradient", "bank")):
            assert torch.equal(x, y), f"{what} ({red})"


def test_emulated_cuda_many_views_update_the_bank_once():
    """V = 17: the bank row is stored in the last chunk of views only, from the row as it was."""
    gen = torch.Generator().manual_seed(3)
    alpha = dps_fast.init_prior(torch.arange(6) % 4, 4, c=5.0, eps=0.05)
    z = torch.randn(17, 6, 4, generator=gen)
    _, _, a = emu_dps(z, torch.arange(6), alpha, "mean", torch.tensor(1.0), gamma=0.5)
    want = 0.5 * alpha + torch.softmax(z, -1).mean(0)
    torch.testing.assert_close(a, want)


@pytest.mark.parametrize("c", [1, 10, 1000, 3000, 5000])  # 5000: the streaming kernel
def test_emulated_cuda_soft_ce_rows_of_any_mass(c):
    gen = torch.Generator().manual_seed(c)
    b = 8
    z = torch.randn(b, c, generator=gen) * 3
    raw = torch.rand(b, c, generator=gen) + 0.01
    mass = torch.tensor([0.0, 0.3, 1.0, 7.0] * 2)
    t = raw / raw.sum(1, keepdim=True) * mass[:, None]
    for red in ("none", "mean", "sum"):
        g = _upstream(b, red, gen)
        grad = torch.empty_like(z)
        loss = E.soft_ce_fwd(z, t, grad, False, RED[red])
        x = z.double().requires_grad_(True)
        want = F.cross_entropy(x, t.double(), reduction=red)
        (want * g.double()).sum().backward()
        torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close((grad * (g[:, None] if red == "none" else g)).double(), x.grad, rtol=1e-5,
                                   atol=1e-6)
    # normalize: cross-entropy against t / s_b; a row of mass 0 has no target (NaN)
    loss = E.soft_ce_fwd(z, t, z.new_empty(0), True, 0)
    assert torch.equal(torch.isnan(loss), mass == 0)
    want = F.cross_entropy(z.double()[mass > 0], (t / t.sum(1, keepdim=True)).double()[mass > 0], reduction="none")
    torch.testing.assert_close(loss[mass > 0].double(), want, rtol=1e-5, atol=1e-5)


def test_emulated_cuda_huge_finite_logits_are_finite():
    """The logits of tests/test_edge_policies.py's huge-logit test, against the fp64 reference:
    two views (the resident kernel) and the same with view 0 again (V = 3: the streaming one)."""
    from test_edge_policies import _huge_logits, _row_scale

    for z in (_huge_logits(), torch.cat([_huge_logits(), _huge_logits()[:1]])):
        c, v = z.shape[-1], z.shape[0]
        alpha = dps_fast.init_prior(torch.tensor([0, 0, c - 1, 0, 0, 0, 0, 3, 4]), c, c=4.0, eps=0.5)
        idx = torch.arange(7)
        g = torch.ones(v, 7)
        lk, gk, ak = emu_dps(z, idx, alpha, "none", g)
        le, ge, ae = ref_dps(z, idx, alpha, "none", g)
        lx, gx, ax = ref_dps(z.double(), idx, alpha.double(), "none", g.double())
        for b in range(7):
            rule_check(lk[:, b], le[:, b], lx[:, b], torch.float32, f"loss row {b}", scale=_row_scale(z[:, b]))
            rule_check(gk[:, b], ge[:, b], gx[:, b], torch.float32, f"grad row {b}")
        rule_check(ak, ae, ax, torch.float32, "bank")
        finite = torch.tensor([True, True, True, True, False, True, False])
        assert torch.equal(torch.isnan(lk).any(0), ~finite)
        assert (ak[:7][finite] != alpha[:7][finite]).any(1).all()
        assert torch.equal(ak[:7][~finite], alpha[:7][~finite])


@pytest.mark.parametrize("d", [3, 1024, 1500, 2100])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_emulated_cuda_supcon_any_feature_width(d, mode):
    """The gradient kernel covers 1024 dimensions per block along y; wider features use more."""
    gen = torch.Generator().manual_seed(d)
    m = 20
    f = torch.randn(m, d, generator=gen)
    lab = torch.randint(0, 3, (m,), generator=gen) if mode == "hard" else None
    soft = torch.softmax(torch.randn(m, 4, generator=gen), -1) if mode == "soft" else None
    loss, grad = E.supcon_fwd(f, lab, soft, 0.2, True, True)
    x = f.double().requires_grad_(True)
    want = R.supcon_loss(x, lab, 0.2, True, None if soft is None else soft.double())
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), x.grad, rtol=1e-4, atol=1e-6)


def _cloned(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _close(got, want, what):
    if isinstance(want, (tuple, list)):
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{what}[{i}]")
    elif isinstance(want, torch.Tensor) and want.numel():
        tol = dict(rtol=2e-5, atol=2e-5) if want.dtype == torch.float32 else {}
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("kernel", _registration.kernels(), ids=lambda k: k.name)
def test_every_kernel_op_has_an_emulated_twin_that_agrees_with_the_cpu_kernel(kernel):
    """Each op module's declared kernel ops (KERNELS) have a mirror of their CUDA glue in
    tests/_cuda_emu.py; on the op's declared samples the emulated CUDA kernel gives the CPU
    kernel's outputs and writes the same tensors (the bank, the gradient buffer)."""
    twin = getattr(E, kernel.name, None)
    assert twin is not None, f"tests/_cuda_emu.py has no mirror of {kernel.name}'s CUDA glue"
    for n, args in enumerate(kernel.samples("cpu")):
        emu_args, cpu_args = _cloned(args), _cloned(args)
        got = twin(*emu_args)
        want = getattr(torch.ops.dps_fast, kernel.name).default(*cpu_args)
        _close(got, want, f"{kernel.name} sample {n}")
        _close(emu_args, cpu_args, f"{kernel.name} sample {n} arguments after the call")

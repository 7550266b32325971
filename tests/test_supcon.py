"""Fused SupCon / NT-Xent against the reference (hard labels, views, soft positives)."""
import pytest
import torch

import dps_fast
from _helpers import FUSED, case_id, rule_check

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run(backend, f, **kw):
    x = f.clone().requires_grad_(True)
    loss = dps_fast.supcon_loss(x, backend=backend, **kw)
    (loss * 0.8).backward()
    return loss.detach(), x.grad


MODES = ["labels", "views", "soft", "flat-labels"]
SHAPES = [(2, 1, 4), (2, 7, 16), (2, 64, 32), (1, 300, 8), (3, 50, 128)]
CASES = [(c, s, m, dt) for c in FUSED for s in SHAPES for m in MODES for dt in DTYPES
         if not (m == "views" and s[0] == 1)
         and not (c == ("triton", "cpu") and s[0] * s[1] > 200)]


@pytest.mark.parametrize("case,shape,mode,dt", CASES,
                         ids=[f"{case_id(c)}-V{s[0]}-B{s[1]}-d{s[2]}-{m}-{str(d)[6:]}" for c, s, m, d in CASES])
def test_supcon_matches_reference(case, shape, mode, dt):
    backend, device = case
    v, b, d = shape
    gen = torch.Generator().manual_seed(v * 100 + b + d)
    f = torch.randn(v, b, d, generator=gen).to(dt).to(device)
    kw = {}
    if mode == "labels":
        kw["labels"] = torch.randint(0, max(2, b // 3), (b,), generator=gen).to(device)
    elif mode == "soft":
        kw["soft_targets"] = torch.softmax(torch.randn(b, 5, generator=gen) * 2, -1).to(device)
    elif mode == "flat-labels":
        f = f.reshape(v * b, d)
        kw["labels"] = torch.randint(0, 4, (v * b,), generator=gen).to(device)
    for tau, normalize in ((0.1, True), (0.5, False)):
        lk, gk = run(backend, f, tau=tau, normalize=normalize, **kw)
        le, ge = run("reference", f, tau=tau, normalize=normalize, **kw)
        kx = {k: (x.double() if x.is_floating_point() else x) for k, x in kw.items()}
        lx, gx = run("reference", f.double(), tau=tau, normalize=normalize, **kx)
        assert gk.dtype == dt and gk.shape == f.shape
        scale = None if normalize else float(f.double().norm(dim=-1).max() ** 2 / tau)
        rule_check(lk, le, lx, torch.float32, f"loss tau={tau}", scale=scale)
        rule_check(gk, ge, gx, dt, f"grad tau={tau}", scale=scale)


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_supcon_no_positives_is_zero_with_zero_grad(case):
    backend, device = case
    f = torch.randn(6, 4, device=device, requires_grad=True)
    loss = dps_fast.supcon_loss(f, labels=torch.arange(6, device=device), backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))


@pytest.mark.parametrize("case", FUSED, ids=case_id)
@pytest.mark.parametrize("d", [1025, 2100])
def test_supcon_any_feature_width(case, d):
    """No backend limits d (docs/method.md §9): the CUDA gradient takes ceil(d / 1024) blocks
    per tile of anchors."""
    backend, device = case
    gen = torch.Generator().manual_seed(d)
    f = torch.randn(2, 12, d, generator=gen).to(device)
    labels = torch.randint(0, 3, (12,), generator=gen).to(device)
    lk, gk = run(backend, f, labels=labels)
    le, ge = run("reference", f, labels=labels)
    lx, gx = run("reference", f.double(), labels=labels)
    rule_check(lk, le, lx, torch.float32, "loss")
    rule_check(gk, ge, gx, torch.float32, "grad")


TRITON = [c for c in FUSED if c[0] == "triton"]


@pytest.mark.parametrize("case", TRITON, ids=case_id)
@pytest.mark.parametrize("d", [1025, 2100])
@pytest.mark.parametrize("mode", ["labels", "soft"])
def test_triton_supcon_backward_runs_in_feature_slices(case, d, mode):
    """The Triton backward splits d > 256 into programs of 256 features (the GPU's launch: at
    BLOCK_D = next_pow2(d) it needed 330 kB of shared memory at d = 1024, over sm_90's 227 kB);
    each slice recomputes the S tile over the whole width. Here 5 and 9 slices, the last one
    1 and 52 features wide, against the reference, unnormalised so the slices' sums matter."""
    import triton
    from dps_fast.kernels import supcon as K
    backend, device = case
    m = 2 * 6
    assert triton.cdiv(d, K._blocks(m, d)[2]) > 1, "the launcher must slice this width"
    gen = torch.Generator().manual_seed(d + len(mode))
    f = (torch.randn(2, 6, d, generator=gen) / d ** 0.5).to(device)
    kw = dict(labels=torch.randint(0, 3, (6,), generator=gen).to(device)) if mode == "labels" else \
        dict(soft_targets=torch.softmax(torch.randn(6, 5, generator=gen), -1).to(device))
    lk, gk = run(backend, f, tau=0.5, normalize=False, **kw)
    le, ge = run("reference", f, tau=0.5, normalize=False, **kw)
    kx = {k: (x.double() if x.is_floating_point() else x) for k, x in kw.items()}
    lx, gx = run("reference", f.double(), tau=0.5, normalize=False, **kx)
    scale = float(f.double().norm(dim=-1).max() ** 2 / 0.5)
    rule_check(lk, le, lx, torch.float32, "loss", scale=scale)
    rule_check(gk, ge, gx, torch.float32, "grad", scale=scale)


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_supcon_labels_are_compared_not_indexed(case):
    """The fused backends group rows by label value (the positive term's class sums): negative
    and huge labels, and one label per row, give the reference's loss and gradient."""
    backend, device = case
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(2, 6, 8, generator=gen).to(device)
    for labels in (torch.tensor([-7, 2 ** 40, -7, 3, 2 ** 40, 0]), torch.arange(6) * 1000):
        got = run(backend, f, labels=labels.to(device))
        want = run("reference", f.double(), labels=labels.to(device))
        rule_check(got[0], run("reference", f, labels=labels.to(device))[0], want[0], torch.float32, "loss")
        rule_check(got[1], run("reference", f, labels=labels.to(device))[1], want[1], torch.float32, "grad")


def _tf32(x):
    """float32 rounded to TF32 (10 mantissa bits), to nearest even, as the tensor cores' inputs."""
    bits = x.view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


def _tf32x3_matmul(a, b):
    """Triton's input_precision="tf32x3" product (dps_fast/kernels/supcon.py::DOT_PRECISION):
    each operand split into a TF32 head and a TF32 tail, three TF32 products summed in float32."""
    a_hi, b_hi = _tf32(a), _tf32(b)
    a_lo, b_lo = _tf32(a - a_hi), _tf32(b - b_hi)
    return a_hi @ b_lo + a_lo @ b_hi + a_hi @ b_hi


@pytest.mark.parametrize("m,d", [(256, 128), (128, 1025), (64, 2100)])
def test_the_triton_kernels_tf32x3_products_meet_the_tolerance_rule(m, d):
    """The GPU kernels' S = F F^T / tau on the tensor cores at float32 accuracy: the tf32x3
    arithmetic (modelled here: Triton's interpreter computes every tl.dot in float32 whatever
    its precision) against float64, within the float32 product's own error plus the rule's
    tolerance, for unit-norm rows (what supcon_loss normalises to) and raw ones."""
    gen = torch.Generator().manual_seed(m + d)
    for f in (torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1),
              torch.randn(m, d, generator=gen) * 3):
        exact = f.double() @ f.double().T
        rule_check(_tf32x3_matmul(f, f.T), f @ f.T, exact, torch.float32, f"tf32x3 S at d = {d}",
                   scale=float((f.double().abs() @ f.double().abs().T).max()))
        # and TF32 alone (one product) would not
        err_tf32 = float((_tf32(f) @ _tf32(f).T - exact).abs().max())
        assert err_tf32 > 10 * float((f @ f.T - exact).abs().max())

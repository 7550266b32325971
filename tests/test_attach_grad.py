"""attach_grad's backward moves no extra pass over the gradient (issue 25, item 4): when
autograd frees the graph (``loss.backward()``), the forward's gradient buffer is scaled in
place by ``dps_fast::scale_unless_one_`` and handed over, and an upstream gradient of exactly 1
touches nothing, decided on the device (csrc/cuda/attach_grad.cu, run here by the CUDA
emulator); when the graph is kept, a new tensor, and the buffer stays as it was."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dps_fast
from dps_fast import reference as R
from _helpers import HAS_CPU, python_path_only

pytestmark = pytest.mark.skipif(not HAS_CPU, reason="the C++ ops are not built")


class OpLog(TorchDispatchMode):
    """The ops dispatched while it is active (by name, e.g. 'aten.mul.Tensor')."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _step(path, monkeypatch, reduction="mean", b=6, c=7, dtype=torch.float32):
    """A fused CPU step on the fast path or the Python path; the logits, the loss, and the
    reference gradient (float64) for an upstream gradient of 1."""
    if path == "python":
        python_path_only(monkeypatch)
    g = torch.Generator().manual_seed(25)
    z = (torch.randn(b, c, generator=g) * 2).to(dtype).requires_grad_()
    idx = torch.randperm(b, generator=g)
    alpha = torch.rand(b + 3, c, generator=g) + 0.5
    ref_alpha = alpha.clone().double()
    loss = dps_fast.dps_cross_entropy(z, idx, alpha, reduction=reduction, backend="cpu")
    zr = z.detach().double().requires_grad_()
    ref = R.dps_cross_entropy(zr, idx, ref_alpha, reduction=reduction)
    (ref.sum() if reduction == "none" else ref).backward()
    return z, loss, zr.grad


def _backward_ops(loss, *args, **kw):
    with OpLog() as log:
        loss.backward(*args, **kw)
    return log.names


def _close(got, want, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("path", ["fast", "python"])
def test_backward_of_one_hands_over_the_buffer_with_no_pass(path, monkeypatch):
    z, loss, want = _step(path, monkeypatch)
    ops = _backward_ops(loss)
    assert "dps_fast.scale_unless_one_.default" in ops, ops
    assert not any(o.startswith(("aten.mul", "aten.clone", "aten.empty", "aten._to_copy")) for o in ops), ops
    _close(z.grad, want, torch.float32)


@pytest.mark.parametrize("path", ["fast", "python"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_of_another_scalar_scales_in_place(path, dtype, monkeypatch):
    z, loss, want = _step(path, monkeypatch, dtype=dtype)
    ops = _backward_ops(loss, torch.tensor(2.5))
    assert "dps_fast.scale_unless_one_.default" in ops, ops
    assert "aten.mul.Tensor" not in ops, ops  # no new B x C tensor
    _close(z.grad, 2.5 * want, dtype)


@pytest.mark.parametrize("path", ["fast", "python"])
def test_per_row_upstream_gradient_scales_in_place(path, monkeypatch):
    z, loss, want = _step(path, monkeypatch, reduction="none")  # want: the gradient of sum(loss)
    w = torch.linspace(-1.0, 2.0, loss.shape[0])
    ops = _backward_ops(loss, w)
    assert "aten.mul_.Tensor" in ops and "aten.mul.Tensor" not in ops, ops
    # rows are independent: d(sum(w * loss))/dz row b is w_b times row b of d sum(loss) / dz
    _close(z.grad, w[:, None].double() * want, torch.float32)


@pytest.mark.parametrize("path", ["fast", "python"])
def test_a_kept_graph_leaves_the_buffer_as_it_was(path, monkeypatch):
    """retain_graph=True: the buffer may be read again, so it is not scaled in place; two
    backwards of 3 accumulate 6 times the gradient (in place, the second would read 3 x)."""
    z, loss, want = _step(path, monkeypatch)
    ops = _backward_ops(loss, torch.tensor(3.0), retain_graph=True)
    assert "dps_fast.scale_unless_one_.default" not in ops and "aten.mul.Tensor" in ops, ops
    loss.backward(torch.tensor(3.0))
    _close(z.grad, 6.0 * want, torch.float32)


@pytest.mark.parametrize("path", ["fast", "python"])
def test_autograd_grad_of_one_with_a_kept_graph_then_freed(path, monkeypatch):
    z, loss, want = _step(path, monkeypatch)
    (g1,) = torch.autograd.grad(loss, z, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, z, torch.tensor(0.5))
    _close(g1, want, torch.float32)
    _close(g2, 0.5 * want, torch.float32)


# ------------------------------------------------------------------ the CUDA kernel, emulated
E = pytest.importorskip("_cuda_emu")


@pytest.mark.skipif(bool(E.unavailable()), reason=f"CUDA emulator: {E.unavailable()}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [0, 1, 257, 1024 * 256 + 3])  # the last: more than the grid, grid-stride
@pytest.mark.parametrize("s", [1.0, 0.5, -3.0, 7e-3])
def test_emulated_cuda_scale_unless_one(dtype, n, s):
    """The kernel computes torch's mul_ bit for bit (float32 product, one rounding), and for
    s == 1 writes nothing: NaN payloads and signed zeros come back as they went in."""
    g = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    if n > 2:
        g[1] = float("nan")
        g[2] = -0.0
    before = g.clone()
    E.scale_unless_one_(g, torch.tensor(s))
    if s == 1.0:
        assert torch.equal(g.view(torch.uint8), before.view(torch.uint8))
        return
    want = before.clone().mul_(torch.tensor(s))
    num = ~want.isnan()  # a NaN stays NaN; its payload is the hardware's
    assert torch.equal(g.isnan(), ~num)
    assert torch.equal(g[num].view(torch.uint8), want[num].view(torch.uint8))


def test_generic_kernel_is_torch_mul_and_skips_one():
    g = torch.randn(5, 3)
    before = g.clone()
    torch.ops.dps_fast.scale_unless_one_(g, torch.tensor(1.0))
    assert torch.equal(g, before)
    torch.ops.dps_fast.scale_unless_one_(g, torch.tensor(-2.0))
    assert torch.equal(g, before * -2.0)

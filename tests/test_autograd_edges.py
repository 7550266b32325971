"""Issue 23, the posterior is the user's training state: autograd's edges around the fused
step (the bank's version counter, the gradient buffer's version and one backward), the
bank's and the gradient's memory overlapping what the step reads, tau_e's range, and
DistributedDPSLoss.forward's argument order."""
import inspect

import numpy as np
import pytest
import torch

import dps_fast
from dps_fast import _validate as checks
from dps_fast import reference as R
from dps_fast.distributed import DistributedDPSLoss
from _helpers import ALL_BACKENDS, FUSED, case_id, python_path_only

CPU_CASES = [c for c in ALL_BACKENDS if c[1] == "cpu"]


def with_paths(cases):
    """(case, path): the cpu backend both ways a call reaches its kernel, the eager fast path
    (csrc/fast_path.cpp) and the Python path (dps_fast/ops/dps_cross_entropy.py::run); the
    other backends (the fast path declines them) the Python path only."""
    return [pytest.param(c, p, id=f"{case_id(c)}-{p}")
            for c in cases for p in (("fast", "python") if c[0] == "cpu" else ("python",))]


def _inputs(device, b=4, c=5, n=10, requires_grad=True):
    g = torch.Generator().manual_seed(23)
    z = torch.randn(b, c, generator=g).to(device).requires_grad_(requires_grad)
    idx = torch.tensor([7, 0, 3, 9][:b], device=device)
    alpha = (torch.rand(n, c, generator=g) + 0.5).to(device)
    return z, idx, alpha


def _use_path(monkeypatch, path):
    if path == "python":
        python_path_only(monkeypatch)


# ----------------------------------------------------------------------- the bank's version counter
@pytest.mark.parametrize("case,path", with_paths(FUSED))
def test_the_step_bumps_the_bank_version_as_the_reference_does(case, path, monkeypatch):
    """The reference writes the bank with index_put_ (a version bump) when ``update``; a fused
    step that does not lets a backward read a bank changed since it was saved."""
    _use_path(monkeypatch, path)
    backend, device = case
    z, idx, alpha = _inputs(device)
    ref_alpha = alpha.clone()
    for update in (False, True):
        v, rv = alpha._version, ref_alpha._version
        dps_fast.dps_cross_entropy(z, idx, alpha, update=update, backend=backend)
        R.dps_cross_entropy(z.detach(), idx, ref_alpha, update=update)
        assert (alpha._version > v) == (ref_alpha._version > rv) == update, f"update={update}"


@pytest.mark.parametrize("case,path", with_paths(FUSED))
def test_a_bank_saved_for_backward_then_stepped_refuses_backward(case, path, monkeypatch):
    _use_path(monkeypatch, path)
    backend, device = case
    z, idx, alpha = _inputs(device)
    w = torch.ones(alpha.shape[1], device=device, requires_grad=True)
    saved = (alpha * w).sum()  # saves the bank for w's gradient
    dps_fast.dps_cross_entropy(z, idx, alpha, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


@pytest.mark.parametrize("path", ["fast", "python"])
def test_dps_loss_bank_saved_for_backward_then_stepped_refuses_backward(path, monkeypatch):
    _use_path(monkeypatch, path)
    crit = dps_fast.DPSLoss(torch.arange(10) % 5, 5)
    z, idx, _ = _inputs("cpu")
    w = torch.ones(5, requires_grad=True)
    saved = (crit.alpha * w).sum()
    crit(z, idx)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


# --------------------------------------------- the Python path's gradient buffer under saved-tensor hooks
def _losses(backend, device):
    """A DPS loss and a soft-CE loss of the Python path (both hang on dps_fast::attach_grad)."""
    z, idx, alpha = _inputs(device)
    t = torch.softmax(torch.randn(4, 5, generator=torch.Generator().manual_seed(1)), -1).to(device)
    yield z, dps_fast.dps_cross_entropy(z, idx, alpha, backend=backend)
    z2 = z.detach().clone().requires_grad_()
    yield z2, dps_fast.soft_cross_entropy(z2, t, backend=backend)


def _hooks():
    return torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x)


@pytest.mark.parametrize("second", ["backward", "autograd.grad"])
@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_a_second_backward_under_saved_tensor_hooks_raises(case, second, monkeypatch):
    """Without retain_graph the graph is freed: the node kept outside the saved variables used to
    run again and add the gradient a second time."""
    python_path_only(monkeypatch)
    with _hooks():
        for z, loss in _losses(*case):
            torch.autograd.grad(loss, z)
            with pytest.raises(RuntimeError, match="a second time"):
                if second == "backward":
                    loss.backward()
                else:
                    torch.autograd.grad(loss, z)
            assert z.grad is None


@pytest.mark.parametrize("case", [c for c in FUSED if c[1] == "cpu"], ids=case_id)
def test_a_gradient_changed_in_place_under_saved_tensor_hooks_is_not_reused(case, monkeypatch):
    """With retain_graph, autograd.grad hands out the buffer itself (upstream gradient 1 on a CPU
    loss): an in-place edit of it used to feed the next backward."""
    python_path_only(monkeypatch)
    with _hooks():
        for z, loss in _losses(*case):
            (g,) = torch.autograd.grad(loss, z, retain_graph=True)
            g.add_(1.0)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                torch.autograd.grad(loss, z, retain_graph=True)
            g.sub_(1.0)  # the values are back, the version is not: still refused
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                torch.autograd.grad(loss, z)


# ------------------------------------------------------------------------------------- tau_e's range
@pytest.mark.parametrize("case,path", with_paths(ALL_BACKENDS))
def test_a_tau_e_below_the_smallest_normal_float32_is_refused_untouched(case, path, monkeypatch):
    """1e-38 is subnormal in float32: flushed to 0 under torch.set_flush_denormal(True), and
    just above the old minimum 1 / FLT_MAX the kernels' 1 / tau_e rounded to inf."""
    _use_path(monkeypatch, path)
    backend, device = case
    z, idx, alpha = _inputs(device)
    before = alpha.clone()
    for tau_e in (1e-38, 3e-39, 1.1754942e-38):
        with pytest.raises(ValueError, match="tau_e must be at least"):
            dps_fast.dps_cross_entropy(z, idx, alpha, tau_e=tau_e, backend=backend)
    assert torch.equal(alpha, before) and alpha._version == before._version
    with pytest.raises(ValueError, match="tau_e must be at least"):
        dps_fast.DPSLoss(torch.arange(10) % 5, 5, tau_e=1e-38, backend=backend)


@pytest.mark.parametrize("flush", [False, True], ids=["denormals", "flush-denormal"])
@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
def test_the_smallest_tau_e_gives_the_reference_step_in_every_backend(case, flush):
    """At the documented minimum every backend's bank stays finite and equals the float64
    reference's: tau_e that small makes the evidence one-hot on each row's maximum."""
    backend, device = case
    assert checks.MIN_TAU_E == torch.finfo(torch.float32).tiny
    z, idx, alpha = _inputs(device)
    exact = alpha.double().cpu()
    if not torch.set_flush_denormal(flush):
        pytest.skip("this CPU cannot flush denormals")
    try:
        loss = dps_fast.dps_cross_entropy(z, idx, alpha, tau_e=checks.MIN_TAU_E, reduction="none",
                                          backend=backend)
        want = R.dps_cross_entropy(z.detach().double().cpu(), idx.cpu(), exact, tau_e=checks.MIN_TAU_E,
                                   reduction="none")
    finally:
        torch.set_flush_denormal(False)
    assert torch.isfinite(alpha).all() and torch.isfinite(loss).all()
    torch.testing.assert_close(alpha.cpu().double(), exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.detach().cpu().double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- memory that the step overwrites
def _numpy_views(offset_rows=2):
    """Logits [4, 3] and a bank [10, 3] over one numpy buffer, from two torch.from_numpy calls:
    two storages, the bank starting ``offset_rows`` rows into the logits."""
    buf = np.linspace(0.5, 2.0, 60, dtype=np.float32)
    logits = torch.from_numpy(buf[:12]).view(4, 3)
    start = 3 * offset_rows
    alpha = torch.from_numpy(buf[start:start + 30]).view(10, 3)
    return buf, logits, alpha


@pytest.mark.parametrize("case,path", with_paths(CPU_CASES))
def test_a_bank_overlapping_the_logits_through_another_storage_is_refused(case, path, monkeypatch):
    _use_path(monkeypatch, path)
    backend, _ = case
    for offset in (2, 0, 3):
        buf, logits, alpha = _numpy_views(offset)
        before = buf.copy()
        assert logits.untyped_storage().data_ptr() != alpha.untyped_storage().data_ptr() or offset == 0
        with pytest.raises(ValueError, match="alpha shares memory with the logits"):
            dps_fast.dps_cross_entropy(logits, torch.tensor([0, 1, 2, 3]), alpha, backend=backend)
        assert np.array_equal(buf, before)
    # next to each other, not overlapping: accepted
    buf, logits, alpha = _numpy_views(4)
    dps_fast.dps_cross_entropy(logits, torch.tensor([5, 6, 7, 8]), alpha, backend=backend)
    assert np.array_equal(buf[:12], np.linspace(0.5, 2.0, 60, dtype=np.float32)[:12])


@pytest.mark.parametrize("case,path", with_paths(CPU_CASES))
def test_a_bank_overlapping_the_index_is_refused(case, path, monkeypatch):
    _use_path(monkeypatch, path)
    backend, _ = case
    buf = np.ones(40, dtype=np.float32)
    alpha = torch.from_numpy(buf[:30]).view(10, 3)
    index = torch.from_numpy(buf[26:30].view(np.int64))  # the bank's last row and a bit, read as ids
    before = buf.copy()
    with pytest.raises(ValueError, match="alpha shares memory with the index"):
        dps_fast.dps_cross_entropy(torch.randn(2, 3), index, alpha, backend=backend)
    assert np.array_equal(buf, before)


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
def test_inplace_grad_over_a_target_that_overlaps_the_logits_is_refused(case):
    """inplace_grad writes the gradient over the logits while the kernel still reads the targets."""
    backend, device = case
    buf = torch.rand(5, 6, device=device, requires_grad=True)
    logits, target = buf[:4], buf[1:5].detach()
    before = buf.detach().clone()
    with pytest.raises(ValueError, match="target shares memory with the logits"):
        dps_fast.soft_cross_entropy(logits, target, inplace_grad=True, backend=backend)
    assert torch.equal(buf.detach(), before)
    # without inplace_grad nothing is written over the logits: accepted, as the reference
    got = dps_fast.soft_cross_entropy(logits, target, backend=backend)
    torch.testing.assert_close(got, R.soft_cross_entropy(logits.detach(), target), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- DistributedDPSLoss.forward's order
def test_distributed_forward_takes_dps_loss_forward_arguments_in_order():
    """Switching between the classes with positional arguments must not swap features and valid."""
    dist = list(inspect.signature(DistributedDPSLoss.forward).parameters)
    local = list(inspect.signature(dps_fast.DPSLoss.forward).parameters)
    assert dist == local == ["self", "logits", "index", "features", "valid"]

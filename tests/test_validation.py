"""Bad input raises the same exception, before the bank is touched, in every backend."""
import pytest
import torch

import dps_fast
from dps_fast._registration import op_modules
from dps_fast.ops import dps_cross_entropy
from _helpers import ALL_BACKENDS, case_id


def _setup(device):
    torch.manual_seed(0)
    alpha = dps_fast.init_prior(torch.randint(0, 5, (20,)), 5).to(device)
    z = torch.randn(4, 5, device=device)
    idx = torch.tensor([0, 3, 7, 19], device=device)
    return alpha, z, idx


# Each op module declares its bad inputs (docs/contributing.md): (what, keyword changes to its
# sample_call, exception, message).
BAD_DPS = dps_cross_entropy.bad_inputs()
BAD = [(mod, bad) for mod in op_modules() for bad in mod.bad_inputs()]


def _on(device, x):
    return x.to(device) if isinstance(x, torch.Tensor) else x


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
@pytest.mark.parametrize("mod,bad", BAD, ids=[f"{m.__all__[0]}: {b.what}" for m, b in BAD])
def test_bad_input_raises_before_any_write(case, mod, bad):
    """Every op's declared bad inputs raise the declared error in every backend, and no tensor
    of the call (the bank included) changes."""
    backend, device = case
    kw = {k: _on(device, v) for k, v in {**mod.sample_call(device), **bad.changes}.items()}
    before = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(bad.error, match=bad.message):
        getattr(mod, mod.__all__[0])(backend=backend, **kw)
    for k, v in before.items():
        assert torch.equal(kw[k], v), f"{bad.what}: {k} changed before the error"


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
@pytest.mark.parametrize("which", ["index", "alpha"])
def test_device_mismatch(case, which):
    """A tensor on another device (meta here, so it runs without a GPU) is a ValueError."""
    backend, device = case
    alpha, z, idx = _setup(device)
    before = alpha.clone()
    kw = dict(logits=z, index=idx, alpha=alpha)
    kw[which] = kw[which].to("meta")
    with pytest.raises(ValueError, match="one device"):
        dps_fast.dps_cross_entropy(backend=backend, **kw)
    assert torch.equal(alpha, before)


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
def test_empty_batch_is_zero_loss_and_no_update(case):
    backend, device = case
    alpha, _, _ = _setup(device)
    before = alpha.clone()
    z = torch.randn(0, 5, device=device, requires_grad=True)
    loss = dps_fast.dps_cross_entropy(z, torch.empty(0, dtype=torch.long, device=device), alpha, backend=backend)
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    assert z.grad.shape == (0, 5)
    none = dps_fast.dps_cross_entropy(z, torch.empty(0, dtype=torch.long, device=device), alpha,
                                      reduction="none", backend=backend)
    assert none.shape == (0,)
    assert torch.equal(alpha, before)


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_logits_never_corrupt_the_bank(case, bad_value):
    backend, device = case
    alpha, z, idx = _setup(device)
    z = z.clone()
    z[1, 2] = bad_value
    before = alpha.clone()
    z.requires_grad_(True)
    loss = dps_fast.dps_cross_entropy(z, idx, alpha, reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
    assert torch.equal(alpha[idx[1]], before[idx[1]]), "bad row must stay untouched"
    assert torch.isfinite(alpha).all()
    assert not torch.equal(alpha[idx[0]], before[idx[0]]), "good rows are still updated"
    loss.sum().backward()
    assert torch.isnan(z.grad[1]).all() and torch.isfinite(z.grad[[0, 2, 3]]).all()


def test_backend_selection_errors(monkeypatch):
    alpha, z, idx = _setup("cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        dps_fast.dps_cross_entropy(z, idx, alpha, backend="tpu")
    with pytest.raises((dps_fast.BackendUnavailableError, ValueError)):
        dps_fast.dps_cross_entropy(z, idx, alpha, backend="cuda")
    monkeypatch.setenv("DPS_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        dps_fast.dps_cross_entropy(z, idx, alpha)
    monkeypatch.setenv("DPS_FAST_BACKEND", "reference")
    dps_fast.dps_cross_entropy(z, idx, alpha)  # env choice works
    if "cpu" in dps_fast.available_backends():
        with pytest.raises(TypeError, match="backend 'cpu' takes float32"):
            dps_fast.dps_cross_entropy(z.double(), idx, alpha, backend="cpu")


def test_the_cuda_probe_names_each_missing_kernel(monkeypatch):
    """A build with some CUDA kernels but not all (a stale or partial build) is refused by name
    before a step, not by the dispatcher in the middle of one; a build with none says so."""
    from dps_fast import _dispatch

    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for cuda_ops, expect in ((set(_dispatch.CUDA_OPS) - {"topk_step"}, "CUDA kernels of topk_step: rebuild"),
                             (set(), "built without CUDA kernels")):
        monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key",
                            lambda op, key, ops=cuda_ops: op.split("::")[1] in ops if key == "CUDA" else has(op, key))
        monkeypatch.setattr(_dispatch, "_state", {})
        monkeypatch.setattr(_dispatch._extension, "load_error", None)
        assert expect in _dispatch._cuda_probe(torch.device("cuda"))


def test_auto_uses_reference_for_float64():
    alpha, z, idx = _setup("cpu")
    a64 = alpha.double()
    ref = a64.clone()
    l1 = dps_fast.dps_cross_entropy(z.double(), idx, a64)
    l2 = dps_fast.reference.dps_cross_entropy(z.double(), idx, ref)
    assert l1.dtype == torch.float64 and torch.equal(l1, l2) and torch.equal(a64, ref)


@pytest.mark.parametrize("index,n", [([0, 5, 5, 1, 1], 10), ([3, -2, 99], 10), ([7, 1, 2], 8), ([4, 4], 2)])
def test_cpp_and_python_index_checks_say_the_same(index, n):
    """CPU tensors are checked in C++ (dps_fast::check_index), CUDA tensors and
    extension-less installs in Python: same exception type, same message."""
    from dps_fast import _validate

    if _validate._fast_check is None:
        pytest.skip("the C++ extension is not built")
    idx = torch.tensor(index)

    def outcome(fn):
        try:
            fn()
            return None
        except (IndexError, ValueError) as e:
            return type(e), str(e).splitlines()[0]

    fast = outcome(lambda: _validate.index_values(idx, n))
    saved, _validate._fast_check = _validate._fast_check, None
    try:
        slow = outcome(lambda: _validate.index_values(idx, n))
    finally:
        _validate._fast_check = saved
    assert fast == slow

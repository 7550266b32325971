"""Bad input raises the same exception, before the bank is touched, in every backend."""
import pytest
import torch

import dps_fast
from _helpers import ALL_BACKENDS, case_id


def _setup(device):
    torch.manual_seed(0)
    alpha = dps_fast.init_prior(torch.randint(0, 5, (20,)), 5).to(device)
    z = torch.randn(4, 5, device=device)
    idx = torch.tensor([0, 3, 7, 19], device=device)
    return alpha, z, idx


BAD_DPS = [
    # (description, mutate kwargs, exception, message)
    ("index out of range", dict(index=torch.tensor([0, 3, 7, 20])), IndexError, "index 20 is out of range"),
    ("negative index", dict(index=torch.tensor([0, -1, 7, 2])), IndexError, "index -1 is out of range"),
    ("duplicate index", dict(index=torch.tensor([0, 3, 3, 2])), ValueError, "duplicate id 3"),
    ("float index", dict(index=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, "index must be an integer"),
    ("index shape", dict(index=torch.tensor([0, 1, 2])), ValueError, r"index must have shape \[4\]"),
    ("integer logits", dict(logits=torch.ones(4, 5, dtype=torch.int64)), TypeError, "floating-point"),
    ("logits rank", dict(logits=torch.randn(5)), ValueError, "logits must have shape"),
    ("class mismatch", dict(logits=torch.randn(4, 6)), ValueError, "alpha has 5 classes but the logits have 6"),
    ("alpha rank", dict(alpha=torch.ones(20 * 5)), ValueError, r"alpha must have shape \[N, C\]"),
    ("integer alpha", dict(alpha=torch.ones(20, 5, dtype=torch.int32)), TypeError, "alpha must be a floating"),
    ("gamma zero", dict(gamma=0.0), ValueError, r"gamma must lie in \(0, 1\]"),
    ("gamma above one", dict(gamma=1.5), ValueError, r"gamma must lie in \(0, 1\]"),
    ("tau_e zero", dict(tau_e=0.0), ValueError, "tau_e must be positive"),
    ("tau_e inf", dict(tau_e=float("inf")), ValueError, "tau_e must be positive"),
    ("target", dict(target="mode"), ValueError, "target must be one of"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction must be one of"),
    ("not a tensor", dict(logits=[[1.0] * 5] * 4), TypeError, "logits must be a torch.Tensor"),
]


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
@pytest.mark.parametrize("bad", BAD_DPS, ids=[b[0] for b in BAD_DPS])
def test_dps_bad_input_raises_before_mutation(case, bad):
    backend, device = case
    alpha, z, idx = _setup(device)
    _, changes, exc, msg = bad
    kw = dict(logits=z, index=idx, alpha=alpha)
    for k, v in changes.items():
        kw[k] = v.to(device) if isinstance(v, torch.Tensor) else v
    before = alpha.clone()
    target_bank = kw["alpha"]
    target_before = target_bank.clone() if isinstance(target_bank, torch.Tensor) else None
    with pytest.raises(exc, match=msg):
        dps_fast.dps_cross_entropy(backend=backend, **kw)
    assert torch.equal(alpha, before)
    if target_before is not None:
        assert torch.equal(target_bank, target_before)


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


@pytest.mark.parametrize("case", ALL_BACKENDS, ids=case_id)
def test_soft_ce_and_supcon_bad_input(case):
    backend, device = case
    z = torch.randn(4, 5, device=device)
    with pytest.raises(ValueError, match="target must have the logits' shape"):
        dps_fast.soft_cross_entropy(z, torch.rand(4, 6, device=device), backend=backend)
    with pytest.raises(TypeError, match="target must be a floating"):
        dps_fast.soft_cross_entropy(z, torch.ones(4, 5, dtype=torch.long, device=device), backend=backend)
    with pytest.raises(ValueError, match="reduction must be one of"):
        dps_fast.soft_cross_entropy(z, torch.rand(4, 5, device=device), reduction="x", backend=backend)
    f = torch.randn(2, 4, 3, device=device)
    with pytest.raises(ValueError, match="tau must be positive"):
        dps_fast.supcon_loss(f, tau=0.0, backend=backend)
    with pytest.raises(ValueError, match="labels must have shape"):
        dps_fast.supcon_loss(f, labels=torch.arange(5, device=device), backend=backend)
    with pytest.raises(TypeError, match="labels must be an integer"):
        dps_fast.supcon_loss(f, labels=torch.rand(4, device=device), backend=backend)
    with pytest.raises(ValueError, match="not both"):
        dps_fast.supcon_loss(f, labels=torch.arange(4, device=device),
                             soft_targets=torch.rand(4, 2, device=device), backend=backend)
    with pytest.raises(ValueError, match="pairs the views"):
        dps_fast.supcon_loss(f[0], backend=backend)


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

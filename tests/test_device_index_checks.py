"""Index checks on the device (dps_fast/_device_checks.py; issue 25, item 5): the default CUDA
step reads nothing back to the host. Here CPU tensors are sent down the CUDA path
(``on_device`` patched), with the eager fast path off, so the path's logic runs without a GPU:
a failed check writes nothing and makes that call's losses NaN, and its error, with the host
check's message, is raised by the next checked call or by anything that reads the bank out;
a dispatch-mode hook sees no host read on the path, where it sees them in the host check."""
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dps_fast
from dps_fast import _device_checks, _validate
from _helpers import HAS_CPU, python_path_only

N, C = 20, 5
BACKENDS = ["reference"] + (["cpu"] if HAS_CPU else [])
BAD = [(torch.tensor([0, 3, 21, -2]), IndexError), (torch.tensor([0, 3, 3, 19]), ValueError)]


@pytest.fixture
def device_path(monkeypatch):
    monkeypatch.setattr(_device_checks, "on_device", lambda index: True)
    python_path_only(monkeypatch)
    _device_checks._pending.clear()
    yield
    _device_checks._pending.clear()


def _host_message(idx):
    with pytest.raises((IndexError, ValueError)) as info:
        _validate.index_values(idx, N)
    return str(info.value)


def _bank():
    return dps_fast.init_prior(torch.arange(N) % C, C)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,error", BAD, ids=["range", "duplicate"])
def test_a_failed_check_writes_nothing_and_the_next_call_raises(device_path, backend, bad, error):
    alpha, z, good = _bank(), torch.randn(4, C), torch.tensor([1, 2, 5, 7])
    before = alpha.clone()
    loss = dps_fast.dps_cross_entropy(z, bad, alpha, backend=backend, reduction="none")
    assert torch.isnan(loss).all() and torch.equal(alpha, before), "the failed call wrote or returned numbers"
    with pytest.raises(error) as info:
        dps_fast.dps_cross_entropy(z, good, alpha, backend=backend)
    assert str(info.value).startswith(_host_message(bad)) and "an earlier call" in str(info.value)
    assert torch.equal(alpha, before), "the raising call wrote"
    dps_fast.dps_cross_entropy(z, good, alpha, backend=backend)  # reported once: the run goes on
    assert not torch.equal(alpha, before)


@pytest.mark.parametrize("readout", ["state_dict", "posterior", "targets", "full_bank", "mean_label_error"])
def test_reading_the_bank_out_raises_a_pending_failure(device_path, readout):
    crit = dps_fast.DPSLoss(torch.arange(N) % C, C)
    before = crit.alpha.clone()
    crit(torch.randn(4, C), torch.tensor([0, 3, 3, 19]))
    assert torch.equal(crit.alpha, before)
    with pytest.raises(ValueError, match="duplicate id 3"):
        getattr(crit, readout)()


def test_a_status_in_flight_is_waited_for_by_read_outs_only(device_path, monkeypatch):
    monkeypatch.setattr(_device_checks._Pending, "ready", lambda self: False)
    crit = dps_fast.DPSLoss(torch.arange(N) % C, C)
    crit(torch.randn(4, C), torch.tensor([0, 3, 25, 19]))
    crit(torch.randn(4, C), torch.tensor([1, 2, 4, 6]))  # the first status has not "arrived": no raise
    with pytest.raises(IndexError, match="index 25 is out of range"):
        crit.state_dict()
    for _ in range(_device_checks._MAX_PENDING + 2):  # at most _MAX_PENDING in flight
        crit(torch.randn(4, C), torch.tensor([1, 2, 4, 6]))
    assert len(_device_checks._pending) <= _device_checks._MAX_PENDING + 1


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's value on the host (on a GPU: a synchronisation)."""
    READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal", "aten::item"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.READS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not HAS_CPU, reason="the fused kernels stand in for the CUDA ones here")
def test_the_default_step_reads_nothing_back(device_path, monkeypatch):
    crit = dps_fast.DPSLoss(torch.arange(N) % C, C, backend="cpu")
    z = torch.randn(4, C, requires_grad=True)
    with HostReads() as hook:
        crit(z, torch.tensor([0, 3, 7, 19])).backward()
        dps_fast.dps_cross_entropy(z, torch.tensor([1, 2, 4, 6]), crit.alpha, backend="cpu")
    assert hook.seen == [], f"host reads on the device path: {hook.seen}"
    monkeypatch.setattr(_device_checks, "on_device", lambda index: False)  # the host check, for contrast
    monkeypatch.setattr(_validate, "_fast_check", None)
    with HostReads() as hook:
        crit(z, torch.tensor([0, 3, 7, 19]))
    assert hook.seen, "the hook did not see the host check's reads"


def test_cuda_indices_take_the_device_path_unless_asked(monkeypatch):
    cuda_like = types.SimpleNamespace(is_cuda=True)
    monkeypatch.delenv("DPS_FAST_SYNC_CHECKS", raising=False)
    assert _device_checks.on_device(cuda_like) and not _device_checks.on_device(torch.zeros(1))
    monkeypatch.setenv("DPS_FAST_SYNC_CHECKS", "1")
    assert not _device_checks.on_device(cuda_like)


def test_status_matches_the_host_check():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(-3, N + 3, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen)
        count, first_bad, dup = _device_checks.status(idx, N).tolist()
        outside = idx[(idx < 0) | (idx >= N)]
        assert count == outside.numel() and (count == 0 or first_bad == int(outside[0]))
        want = _validate.first_duplicate(idx)
        assert dup == (_device_checks.NO_DUPLICATE if want is None else want)

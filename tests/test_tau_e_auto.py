"""DPSLoss(tau_e="auto") (docs/method.md §10, issue 27): the noise-adaptive evidence
temperature tau_e = max(0.1, 1 - 2 * the bank's mean label-error score), set by the loss itself
once per pass over the bank, counted in samples seen; its state is the loss's state."""
import io
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

import dps_fast
from _helpers import one_rank_gloo

N, C = 20, 5


def make(**kw):
    return dps_fast.DPSLoss(torch.arange(N) % C, C, c=4.0, eps=0.5, **kw)


def batches(count, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, C, generator=gen) * 3, torch.randperm(N, generator=gen)[:size]) for _ in range(count)]


def expected(crit):
    return max(0.1, 1 - 2 * crit.mean_label_error())


@pytest.mark.parametrize("size", [1, 8])
def test_adapts_once_per_pass_counted_in_samples_not_calls(size):
    crit = make(tau_e="auto")
    adapted = []
    for step, (z, idx) in enumerate(batches(int(2.5 * N / size) + 1, size)):
        before = crit.tau_e
        crit(z, idx)
        seen = (step + 1) * size
        crossed = seen // N > (seen - size) // N
        if crossed:
            adapted.append(step)
            assert crit.tau_e == expected(crit)
        else:
            assert crit.tau_e == before
    assert len(adapted) == 2 and crit.tau_e < 1.0  # the weak prior leaves label errors to adapt to


def test_eval_never_counts_nor_adapts():
    crit = make(tau_e="auto")
    crit.eval()
    for z, idx in batches(10, 8):
        crit(z, idx)
    assert crit.auto_tau_e.seen == 0 and crit.tau_e == 1.0


def test_resume_from_a_state_dict_is_bit_identical():
    steps = batches(11, 6)
    whole = make(tau_e="auto")
    for z, idx in steps:
        whole(z, idx)
    first = make(tau_e="auto")
    for z, idx in steps[:4]:
        first(z, idx)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = make(tau_e="auto")
    second.load_state_dict(torch.load(buf, weights_only=True))
    for z, idx in steps[4:]:
        second(z, idx)
    assert torch.equal(second.alpha, whole.alpha) and second.tau_e == whole.tau_e
    assert (second.auto_tau_e.seen, second.auto_tau_e.next_at) == (whole.auto_tau_e.seen, whole.auto_tau_e.next_at)


def test_a_fixed_tau_e_is_todays_step_bit_for_bit():
    fixed, plain = make(tau_e=1.0), make()
    for z, idx in batches(9, 8):
        assert torch.equal(fixed(z, idx), plain(z, idx))
    assert fixed.tau_e == 1.0 and "tau_e_auto" not in fixed.state_dict()
    with pytest.raises((TypeError, ValueError), match="tau_e"):
        make(tau_e="automatic")


@pytest.fixture(scope="module")
def gloo():
    with one_rank_gloo():
        yield


@pytest.mark.parametrize("kind", ["host", "replicated", "sharded"])
def test_every_bank_kind_adapts_as_the_local_bank(kind, request):
    if kind != "host":
        request.getfixturevalue("gloo")
    local, other = make(tau_e="auto"), make(tau_e="auto", bank=kind)
    for z, idx in batches(8, 7):
        local(z, idx)
        other(z, idx)
        assert other.tau_e == local.tau_e


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_two_ranks_adapt_together_on_the_global_batch(mode):
    """Local batches of 4 and 3 samples: the pass is counted in global samples (7 a step), so
    both ranks adapt at the same step, to the same tau_e."""
    from _tau_auto_workers import worker_two_ranks

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker_two_ranks, args=(2, tmp, mode, tmp), nprocs=2, join=True)
        taus = [torch.load(os.path.join(tmp, f"taus{r}.pt")) for r in range(2)]
    assert taus[0] == taus[1]
    first_change = next(i for i, t in enumerate(taus[0]) if t != 1.0)
    assert first_change == 3  # 4 steps x 7 = 28 >= N = 24 global samples

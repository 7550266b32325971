"""DPSLoss(tau_e="auto") (docs/method.md §10, issue 27): the noise-adaptive evidence
temperature tau_e = max(0.1, 1 - 2 * the bank's mean label-error score), set by the loss itself
once per pass over the bank, counted in samples seen; its state is the loss's state."""
import io
import os
import tempfile

import pytest
import torch

import dps_fast
from _helpers import one_rank_gloo
from _ranks import spawn_ranks

N, C = 20, 5


def make(**kw):
    return dps_fast.DPSLoss(torch.arange(N) % C, C, c=4.0, eps=0.5, **kw)


def batches(count, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, C, generator=gen) * 3, torch.randperm(N, generator=gen)[:size]) for _ in range(count)]


def expected(crit):
    return max(0.1, 1 - 2 * crit.mean_label_error())


def batch_scores(crit, idx):
    """The label-error scores of the batch's rows as they are now, computed here on its own."""
    rows = crit.alpha[idx].double()
    return 1 - rows[torch.arange(len(idx)), crit.given_labels[idx]] / rows.sum(1)


@pytest.mark.parametrize("size", [1, 8])
def test_adapts_once_per_pass_counted_in_samples_not_calls(size):
    """Random batches (a sample may come twice in a pass, or not at all): at each pass's end
    tau_e is set from the mean score of the rows the pass's steps wrote, and only then."""
    crit = make(tau_e="auto")
    read_all = crit.store.iter_rows
    crit.store.iter_rows = lambda *a: pytest.fail("tau_e='auto' read the whole bank")  # no pass over the bank
    adapted, scores = [], []
    for step, (z, idx) in enumerate(batches(int(2.5 * N / size) + 1, size)):
        before = crit.tau_e
        crit(z, idx)
        scores.append(batch_scores(crit, idx))
        seen = (step + 1) * size
        if seen // N > (seen - size) // N:
            adapted.append(step)
            assert crit.tau_e == pytest.approx(max(0.1, 1 - 2 * float(torch.cat(scores).mean())), rel=1e-6)
            scores = []
        else:
            assert crit.tau_e == before
    assert len(adapted) == 2 and crit.tau_e < 1.0  # the weak prior leaves label errors to adapt to
    crit.store.iter_rows = read_all


def test_each_sample_once_a_pass_gives_the_banks_mean_at_the_passs_end():
    """With epochs (each sample once a pass) the running statistic is mean_label_error(): a
    row's score changes only when a step writes it."""
    crit = make(tau_e="auto")
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for idx in torch.randperm(N, generator=gen).split(6):
            crit(torch.randn(len(idx), C, generator=gen) * 3, idx)
        assert crit.tau_e == pytest.approx(expected(crit), rel=1e-6) and crit.tau_e < 1.0


def test_padding_repeats_do_not_count_in_the_statistic():
    crit, gen = make(tau_e="auto"), torch.Generator().manual_seed(4)
    idx = torch.randperm(N, generator=gen)
    valid = torch.arange(N) % 3 != 0
    crit(torch.randn(N // 2, C, generator=gen) * 3, idx[:N // 2], valid=valid[:N // 2])
    assert crit.auto_tau_e.seen == int(valid[:N // 2].sum())  # padding repeats are no new samples
    crit(torch.randn(N // 2, C, generator=gen) * 3, idx[N // 2:], valid=valid[N // 2:])
    assert crit.auto_tau_e.seen == int(valid.sum()) < N and crit.tau_e == 1.0  # not a pass yet
    crit(torch.randn(N, C, generator=gen) * 3, idx)
    assert crit.tau_e < 1.0


def test_the_top_k_bank_keeps_the_same_statistic_from_its_compressed_rows():
    dense, topk = make(tau_e="auto"), make(tau_e="auto", top_k=4)
    gen = torch.Generator().manual_seed(5)
    for idx in torch.randperm(N, generator=gen).split(7):
        z = torch.randn(len(idx), C, generator=gen) * 3
        dense(z, idx)
        topk(z, idx)
    assert topk.tau_e == pytest.approx(dense.tau_e, rel=1e-6) and topk.tau_e < 1.0


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


def test_another_ranks_sums_are_not_loaded():
    """A state dict keeps the rank and world its pass sums belong to: a replica saved on one
    rank and loaded on another keeps tau_e and the counters, not the other rank's sums."""
    crit = make(tau_e="auto")
    for z, idx in batches(4, 7):
        crit(z, idx)
    state = crit.state_dict()
    assert state["tau_e_auto"][5:].tolist() == [0.0, 1.0] and state["tau_e_auto"][4] == 7  # the 4th batch (after 21)
    other = make(tau_e="auto")
    state["tau_e_auto"][5] = 1  # as if rank 1 of 1 had saved it
    other.load_state_dict(state)
    assert (other.tau_e, other.auto_tau_e.seen) == (crit.tau_e, crit.auto_tau_e.seen)
    assert other.auto_tau_e.sums() == [0.0, 0.0] and crit.auto_tau_e.sums()[1] == 7


def test_a_fixed_tau_e_is_todays_step_bit_for_bit():
    """tau_e=1.0 is DPS as published: the same op, on the same bank, as the functional API."""
    fixed = make(tau_e=1.0)
    alpha = fixed.alpha.clone()
    for z, idx in batches(9, 8):
        assert torch.equal(fixed(z, idx), dps_fast.dps_cross_entropy(z, idx, alpha, gamma=0.95, tau_e=1.0))
    assert torch.equal(fixed.alpha, alpha) and fixed.tau_e == 1.0 and "tau_e_auto" not in fixed.state_dict()
    with pytest.raises((TypeError, ValueError), match="tau_e"):
        make(tau_e="automatic")


def test_auto_is_the_default_and_starts_at_one():
    crit = make()
    assert crit.auto_tau_e is not None and crit.tau_e == 1.0 and "tau_e_auto" in crit.state_dict()


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
def test_two_ranks_adapt_together_on_the_global_batch_and_resume_mid_pass(mode):
    """Local batches of 4 and 3 samples: the pass is counted in global samples (7 a step), so
    both ranks adapt at the same step, to the same tau_e; a mid-pass checkpoint (tau_e_state: the
    pass's sums over the ranks) resumes bit for bit."""
    from _tau_auto_workers import worker_two_ranks

    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(worker_two_ranks, 2, 2, tmp, mode, tmp)
        got = [torch.load(os.path.join(tmp, f"taus{r}.pt"), weights_only=True) for r in range(2)]
    assert got[0]["taus"] == got[1]["taus"]
    first_change = next(i for i, t in enumerate(got[0]["taus"]) if t != 1.0)
    assert first_change == 3  # 4 steps x 7 = 28 >= N = 24 global samples
    assert len(set(got[0]["taus"])) == 3  # adapted again in the 7th step (49 >= 48)
    for r in range(2):
        assert got[r]["resumed"] == got[r]["taus"][5:] and got[r]["same_bank"]
        assert torch.equal(got[r]["saved"], got[0]["saved"])  # every rank wrote the same global state
    assert got[0]["saved"][4] == 7  # the fifth global batch (the sums restart at each adaptation), both ranks

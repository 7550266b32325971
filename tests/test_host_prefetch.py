"""HostDPSLoss.prefetch is never stale, whatever happens between the prefetch and the step
(docs/method.md §9): every sequence gives the bank of a local DPSLoss that never prefetches."""
import pytest
import torch

import dps_fast

N, C = 24, 5


def _pair(**kw):
    labels = torch.arange(N) % C
    return dps_fast.HostDPSLoss(labels, C, gamma=0.8, **kw), dps_fast.DPSLoss(labels, C, gamma=0.8, **kw)


def _step(crit, z, idx):
    crit(z.clone().requires_grad_(), idx).backward()


def _read_bank(host):
    return host.alpha


def _read_dtype(host):
    return host.store.dtype


def _read_targets(host):
    return host.targets(torch.tensor([0, 1]))


def _flush(host):
    host.flush()


def _read_state_dict(host):
    return host.state_dict()


# anything that reads the bank between the prefetch and the step flushes the write-back first
READS = [_read_bank, _read_dtype, _read_targets, _flush, _read_state_dict]


@pytest.mark.parametrize("read", READS, ids=lambda f: f.__name__)
def test_a_read_between_prefetch_and_step_does_not_make_the_prefetch_stale(read):
    torch.manual_seed(0)
    host, local = _pair()
    first, second = torch.tensor([3, 7, 11]), torch.tensor([7, 2, 3])  # ids 3 and 7 in both
    for idx in (first, second, first):
        z = torch.randn(len(idx), C) * 3
        _step(host, z, idx)
        _step(local, z, idx)
        host.prefetch(second if idx is first else first)
        read(host)
    assert torch.equal(host.alpha, local.alpha)


def test_a_prefetch_taken_before_the_previous_step_is_refreshed():
    torch.manual_seed(1)
    host, local = _pair()
    cur, nxt = torch.tensor([1, 2, 3]), torch.tensor([3, 4, 1])
    host.prefetch(nxt)  # before the step that updates rows 1 and 3
    for idx in (cur, nxt):
        z = torch.randn(len(idx), C) * 3
        _step(host, z, idx)
        _step(local, z, idx)
    assert torch.equal(host.alpha, local.alpha)


def test_a_write_into_the_bank_after_the_prefetch_is_seen_by_the_step():
    torch.manual_seed(2)
    host, local = _pair()
    idx = torch.tensor([5, 6])
    host.prefetch(idx)
    with torch.no_grad():
        host.alpha[5] += 1.0  # an in-place edit of the bank
        local.alpha[5] += 1.0
    z = torch.randn(2, C)
    _step(host, z, idx)
    _step(local, z, idx)
    assert torch.equal(host.alpha, local.alpha)


def test_a_state_dict_load_after_the_prefetch_is_seen_by_the_step():
    torch.manual_seed(3)
    host, local = _pair()
    other = dps_fast.HostDPSLoss(torch.arange(N) % C, C, gamma=0.8)
    _step(other, torch.randn(4, C) * 4, torch.tensor([0, 1, 2, 3]))
    idx = torch.tensor([0, 1])
    host.prefetch(idx)
    host.load_state_dict(other.state_dict())
    local.alpha.copy_(other.alpha)
    z = torch.randn(2, C)
    _step(host, z, idx)
    _step(local, z, idx)
    assert torch.equal(host.alpha, local.alpha)


def test_an_eval_step_between_prefetch_and_step_keeps_the_prefetch_correct():
    torch.manual_seed(4)
    host, local = _pair()
    a, b = torch.tensor([1, 2]), torch.tensor([2, 9])
    z1, z2 = torch.randn(2, C) * 3, torch.randn(2, C) * 3
    _step(host, z1, a)
    _step(local, z1, a)
    host.prefetch(b)
    host.eval()
    with torch.no_grad():
        host(torch.randn(2, C), a)  # reads, never writes
    host.train()
    _step(host, z2, b)
    _step(local, z2, b)
    assert torch.equal(host.alpha, local.alpha)


def test_random_interleavings_match_the_local_bank():
    g = torch.Generator().manual_seed(5)
    host, local = _pair()
    actions = ("step", "prefetch", "read", "eval")
    for _ in range(60):
        act = actions[int(torch.randint(0, 4, (1,), generator=g))]
        idx = torch.randperm(N, generator=g)[:4]
        if act == "prefetch":
            host.prefetch(idx)
        elif act == "read":
            READS[int(torch.randint(0, len(READS), (1,), generator=g))](host)
        else:
            z = torch.randn(4, C, generator=g) * 3
            if act == "eval":
                with torch.no_grad():
                    host.eval(), local.eval()
                    torch.testing.assert_close(host(z, idx), local(z, idx))
                    host.train(), local.train()
            else:
                _step(host, z, idx)
                _step(local, z, idx)
    assert torch.equal(host.alpha, local.alpha)

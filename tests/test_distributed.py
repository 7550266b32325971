"""dps_fast.distributed under gloo on CPU with 2 and 3 processes."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import dps_fast
from dps_fast import distributed as D
from _ranks import spawn_ranks
from _dist_workers import (_single_process, _worker_errors, _worker_load, _worker_padding, _worker_save,
                           _worker_train)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_matches_single_process_after_three_epochs(mode, world):
    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(_worker_train, world, world, tmp, mode, tmp)
        got = torch.load(os.path.join(tmp, f"{mode}-{world}.pt"), weights_only=True)
    bank, losses, w = _single_process(world)
    torch.testing.assert_close(got["bank"], bank, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["losses"], losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["w"], w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode,bank_dtype", [("replicated", torch.float32), ("sharded", torch.float32),
                                             ("sharded", torch.bfloat16)])
def test_padding_duplicates_are_updated_once(mode, bank_dtype):
    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(_worker_padding, 3, 3, tmp, mode, tmp, bank_dtype)
        bank = torch.load(os.path.join(tmp, "pad.pt"), weights_only=True)
    # gamma = 1, zero logits: each update adds 1/3 to every class, i.e. +1 to the row mass
    prior_mass = 2.0 + 2 * 1.0
    tol = 1e-6 if bank_dtype == torch.float32 else 2e-2  # bf16 rounds each stored row
    torch.testing.assert_close(bank.sum(1), torch.full((10,), prior_mass + 1.0), rtol=tol, atol=tol)


def test_checkpoint_at_two_ranks_resumes_at_three():
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "s1"))
        os.makedirs(os.path.join(tmp, "s2"))
        spawn_ranks(_worker_save, 2, 2, os.path.join(tmp, "s1"), "sharded", tmp)
        spawn_ranks(_worker_load, 3, 3, os.path.join(tmp, "s2"), "sharded", tmp)
        saved = torch.load(os.path.join(tmp, "saved_full.pt"), weights_only=True)
        loaded = torch.load(os.path.join(tmp, "loaded_full.pt"), weights_only=True)
        assert torch.equal(saved, loaded)
        assert not torch.equal(saved, dps_fast.init_prior(torch.arange(17) % 4, 4))


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_bad_index_on_one_rank_raises_on_all_without_hanging(mode):
    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(_worker_errors, 2, 2, tmp, mode, tmp)
        for r in range(2):
            res = torch.load(os.path.join(tmp, f"err{r}.pt"), weights_only=False)
            assert res["o"].startswith("IndexError") and "index 25 is out of range" in res["o"], res
            assert res["o"].endswith("(rank 1)"), res
            assert res["o2"].startswith("ValueError") and "duplicate id 4" in res["o2"], res
            assert res["o2"].endswith("(rank 0)"), res
            assert res["unchanged"]


def test_bank_before_init_process_group_is_an_error():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        D.DistributedDPSLoss(torch.arange(4) % 2, 2)


def test_traffic_model_imagenet():
    t = D.traffic_model(1_281_167, 1000, 256, 8)
    assert abs(t["replicated_bank_bytes"] / 1e9 - 5.12) < 0.01
    assert abs(t["sharded_bank_bytes"] / 1e9 - 0.64) < 0.01
    assert t["sharded_step_bytes"] < t["replicated_step_bytes"]


def test_host_bank_matches_dps_cross_entropy_with_prefetch():
    torch.manual_seed(0)
    labels = torch.randint(0, 7, (40,))
    host = dps_fast.HostDPSLoss(labels, 7, gamma=0.8, tau_e=1.0)
    alpha = dps_fast.init_prior(labels, 7)
    order = torch.randperm(40)
    batches = [order[k:k + 8] for k in range(0, 40, 8)] + [order[:8]]  # last batch revisits rows
    for k, idx in enumerate(batches):
        z = torch.randn(2, 8, 7, requires_grad=True)
        if k % 2 == 0:
            host.prefetch(idx)  # prefetched while the previous step's write-back is pending
        got = host(z, idx)
        want = dps_fast.reference.dps_cross_entropy(z, idx, alpha, gamma=0.8)
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(host.bank, alpha)
    sd = host.state_dict()
    h2 = dps_fast.HostDPSLoss(labels, 7, gamma=0.8)
    h2.load_state_dict(sd)
    assert torch.equal(h2.bank, host.bank)
    host.eval()
    before = host.bank.clone()
    host(torch.randn(8, 7), batches[0])
    assert torch.equal(host.bank, before)
    with pytest.raises(IndexError):
        host(torch.randn(1, 7), torch.tensor([40]))

"""DPSLoss: the bank as module state, train/eval behaviour, read-outs, contrastive term."""
import io

import pytest
import torch

import dps_fast
from dps_fast import reference as R
from _helpers import HAS_CPU, eager_spy, python_path_only


def test_state_dict_roundtrip_and_to():
    labels = torch.tensor([0, 2, 1, 2])
    m = dps_fast.DPSLoss(labels, 3, c=10.0, eps=0.1, gamma=0.8)
    z = torch.randn(2, 3)
    m(z, torch.tensor([1, 3]))
    sd = m.state_dict()
    assert set(sd) == {"alpha", "given_labels", "tau_e_auto"}  # tau_e="auto", the default: its state too
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    m2 = dps_fast.DPSLoss(labels, 3, c=10.0, eps=0.1, gamma=0.8)
    m2.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(m2.alpha, m.alpha)
    m3 = m2.to(torch.device("meta"))
    assert m3.alpha.device.type == "meta"


def test_train_updates_eval_does_not_and_matches_functional():
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (30,))
    m = dps_fast.DPSLoss(labels, 5, gamma=0.9)
    alpha = dps_fast.init_prior(labels, 5)
    z = torch.randn(8, 5)
    idx = torch.randperm(30)[:8]
    torch.testing.assert_close(m(z, idx), R.dps_cross_entropy(z, idx, alpha, gamma=0.9))
    torch.testing.assert_close(m.alpha, alpha)
    m.eval()
    before = m.alpha.clone()
    m(z, idx)
    assert torch.equal(m.alpha, before)


@pytest.mark.skipif(not HAS_CPU, reason="the C++ ops are not built")
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_local_bank_eager_fast_path_matches_the_python_path(monkeypatch, bank_dtype):
    """DPSLoss on a local CPU bank runs its step through the eager fast path (csrc/fast_path.cpp):
    the same losses, gradients and bank, bit for bit, in train and eval mode; a padded batch
    (valid mask) takes the bank's own path."""
    labels = torch.randint(0, 7, (40,), generator=torch.Generator().manual_seed(1))
    z = torch.randn(3, 16, 7, generator=torch.Generator().manual_seed(2)) * 2
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:16]

    def run():
        m = dps_fast.DPSLoss(labels, 7, bank_dtype=bank_dtype, tau_e=2.0, reduction="sum")
        out = []
        for mode in ("train", "eval", "train"):
            m.train(mode == "train")
            x = z.clone().requires_grad_(True)
            loss = m(x, idx)
            loss.backward()
            out += [loss.detach(), x.grad]
        m(z[0], idx, valid=torch.arange(16) % 5 != 0)
        return out + [m.alpha.clone()]

    taken = eager_spy(monkeypatch)
    fast = run()
    assert len(taken) == 3, "the local bank's steps did not take the eager fast path"
    python_path_only(monkeypatch)
    slow = run()
    for k, (got, want) in enumerate(zip(fast, slow)):
        assert torch.equal(got, want), k


def test_bf16_bank_and_targets_and_posterior():
    labels = torch.tensor([0, 1, 1])
    m = dps_fast.DPSLoss(labels, 2, c=4.0, eps=1.0, bank_dtype=torch.bfloat16)
    assert m.alpha.dtype == torch.bfloat16
    torch.testing.assert_close(m.targets(), torch.tensor([[0.8, 0.2], [0.2, 0.8], [0.2, 0.8]]))
    r = m.posterior()
    torch.testing.assert_close(r["label_error"], torch.tensor([0.2, 0.2, 0.2]))
    assert set(r) >= {"mean", "alpha0", "entropy", "expected_entropy", "mutual_information"}


def test_explicit_prior_and_errors():
    prior = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    m = dps_fast.DPSLoss(prior=prior)
    assert torch.equal(m.alpha, prior) and torch.equal(m.given_labels, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="finite and > 0"):
        dps_fast.DPSLoss(prior=torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="give labels and num_classes"):
        dps_fast.DPSLoss()
    with pytest.raises(ValueError, match="gamma"):
        dps_fast.DPSLoss(torch.tensor([0]), 2, gamma=0.0)
    with pytest.raises(ValueError, match="con_positives"):
        dps_fast.DPSLoss(torch.tensor([0]), 2, con_positives="x")


@pytest.mark.parametrize("positives", ["hard", "soft", "views"])
def test_contrastive_term(positives):
    torch.manual_seed(1)
    labels = torch.randint(0, 4, (20,))
    m = dps_fast.DPSLoss(labels, 4, contrastive_weight=0.5, con_positives=positives)
    alpha = dps_fast.init_prior(labels, 4)
    z = torch.randn(2, 6, 4)
    f = torch.randn(2, 6, 8, requires_grad=True)
    idx = torch.randperm(20)[:6]
    got = m(z, idx, f)
    want = R.dps_cross_entropy(z, idx, alpha, gamma=0.95)
    rows = alpha[idx]
    kw = {"labels": rows.argmax(1)} if positives == "hard" else \
        {"soft_targets": rows / rows.sum(1, keepdim=True)} if positives == "soft" else {}
    want = want + 0.5 * R.supcon_loss(f, tau=0.1, **kw)
    torch.testing.assert_close(got, want)
    got.backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()
    with pytest.raises(ValueError, match="pass features"):
        m(z, idx)


def test_tau_e_can_be_set_between_steps_and_is_checked():
    """A schedule sets crit.tau_e at each epoch start (docs/results.md §5): the next step uses it,
    exactly as dps_cross_entropy with that tau_e; a bad value raises and changes nothing."""
    labels = torch.tensor([0, 1, 2, 1])
    crit = dps_fast.DPSLoss(labels, 3, backend="reference", tau_e=1.0)
    alpha = crit.full_bank()
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    crit.tau_e = 0.5
    assert crit.tau_e == 0.5
    got = crit(z, torch.arange(4))
    want = dps_fast.dps_cross_entropy(z, torch.arange(4), alpha, tau_e=0.5, backend="reference")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(crit.full_bank(), alpha)
    for bad in (0.0, -1.0, float("nan"), 1e-40):
        with pytest.raises(ValueError, match="tau_e"):
            crit.tau_e = bad
    assert crit.tau_e == 0.5


def test_adapt_tau_e_follows_the_mean_label_error():
    """docs/results.md §5: tau_e = max(floor, 1 - k * mean label-error score of the bank)."""
    labels = torch.tensor([0, 1, 2, 1, 0])
    crit = dps_fast.DPSLoss(labels, 3, c=4.0, eps=0.5, backend="reference")
    bank = crit.full_bank().double()
    t = bank / bank.sum(1, keepdim=True)
    want = float((1 - t.gather(1, labels[:, None])[:, 0]).mean())
    assert abs(crit.mean_label_error(chunk_rows=2) - want) < 1e-9
    readout = dps_fast.posterior_readouts(crit.full_bank(), labels)["label_error"].mean()
    assert abs(crit.mean_label_error() - float(readout)) < 1e-6
    assert crit.adapt_tau_e(k=0.5) == pytest.approx(1 - 0.5 * want)
    assert crit.tau_e == pytest.approx(1 - 0.5 * want)
    assert crit.adapt_tau_e(k=100.0, floor=0.2) == 0.2
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="k must be positive"):
            crit.adapt_tau_e(k=bad)
    assert crit.tau_e == 0.2

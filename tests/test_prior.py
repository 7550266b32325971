"""The prior's off-label mass as a fraction of c (docs/method.md §1, issue 26 item 1): the
default keeps C = 10 exactly as before and scales eps with C; an explicit eps wins."""
import warnings

import pytest
import torch

import dps_fast
from dps_fast import prior as P


def test_default_at_ten_classes_is_the_old_default_bit_for_bit():
    labels = torch.arange(50) % 10
    assert P.prior_eps(10, 100.0) == 0.01
    assert torch.equal(dps_fast.init_prior(labels, 10), dps_fast.init_prior(labels, 10, eps=0.01))
    crit = dps_fast.DPSLoss(labels, 10)
    assert crit.eps == 0.01 and torch.equal(crit.alpha, dps_fast.init_prior(labels, 10, eps=0.01))


@pytest.mark.parametrize("num_classes", [2, 100, 1000, 21841])
@pytest.mark.parametrize("c", [1.0, 100.0])
def test_the_off_label_share_of_c_is_the_same_at_any_C(num_classes, c):
    for share, kw in ((P.DEFAULT_OFF_LABEL, {}), (0.05, {"off_label": 0.05})):
        alpha = dps_fast.init_prior(torch.tensor([0, num_classes - 1]), num_classes, c=c, dtype=torch.float64, **kw)
        eps = alpha[0, 1:]
        assert torch.equal(eps, torch.full_like(eps, eps[0].item())) and alpha[0, 0] == c
        # eps * (C - 1) / c is the share, up to the two roundings of eps = share * c / (C - 1)
        assert float(eps[0]) * (num_classes - 1) / c == pytest.approx(share, rel=4 * torch.finfo(torch.float64).eps)


def test_explicit_eps_wins_and_warns_only_when_it_crowds_the_label():
    labels = torch.arange(30) % 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dps_fast.DPSLoss(labels, 1000, eps=0.01).eps == 0.01  # 9.99% of c: no warning
        assert dps_fast.init_prior(labels, 21841, eps=0.01)[0, 1] == 0.01  # the functional op never warns
    with pytest.warns(UserWarning, match=r"is 2\.18 of c = 100: the initial target puts 31% on the label; give "
                                         r"off_label="):
        crit = dps_fast.DPSLoss(labels, 21841, eps=0.01)
    assert crit.eps == 0.01


@pytest.mark.parametrize("kw, msg", [(dict(eps=0.01, off_label=0.001), "give eps or off_label"),
                                     (dict(off_label=0.0), "off_label"), (dict(off_label=-1.0), "off_label"),
                                     (dict(eps=0.0), "eps")])
def test_bad_prior_settings_raise_before_a_bank_exists(kw, msg):
    with pytest.raises(ValueError, match=msg):
        dps_fast.DPSLoss(torch.arange(5), 10, **kw)
    with pytest.raises(ValueError, match=msg):
        dps_fast.init_prior(torch.arange(5), 10, **kw)


def test_every_loss_class_takes_off_label():
    crit = dps_fast.HostDPSLoss(torch.arange(8) % 4, 4, off_label=0.03)
    assert crit.eps == pytest.approx(0.03 * 100 / 3, rel=1e-15)
    # label issues subtract the prior the bank was built with
    assert crit.find_label_issues(rate=0.25).num_samples == 8

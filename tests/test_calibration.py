"""dps_fast.calibration: temperature fits against labels, soft targets and a DPS bank."""
import pytest
import torch

from dps_fast.calibration import (bank_transition, fit_resolution, fit_temperature, posterior_temperature,
                                  scaled_cross_entropy)


def _logits(n, c, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, c, generator=g, dtype=torch.float64), g


@pytest.mark.parametrize("t_true", [0.4, 1.0, 2.5])
def test_fit_recovers_temperature_from_labels(t_true):
    z, g = _logits(20000, 10, 0)
    # labels drawn from softmax(z / t_true): the NLL-optimal temperature is t_true
    y = torch.multinomial(torch.softmax(z / t_true, -1), 1, generator=g).squeeze(1)
    assert abs(fit_temperature(z, y) / t_true - 1) < 0.05


@pytest.mark.parametrize("t_true", [0.5, 1.7])
def test_fit_recovers_temperature_from_soft_targets_exactly(t_true):
    # soft targets softmax(z / t_true): the cross-entropy is minimal exactly at t_true
    z, _ = _logits(500, 7, 1)
    t = fit_temperature(z.float(), torch.softmax(z / t_true, -1).float())
    assert abs(t / t_true - 1) < 1e-3


def test_soft_targets_are_normalised_per_row():
    z, _ = _logits(300, 5, 2)
    target = torch.softmax(z / 0.8, -1)
    scaled = target * torch.linspace(1, 50, 300)[:, None].double()  # a bank's rows: any positive mass
    # the two problems differ by rounding alone: the fits agree to the fit's own resolution
    assert fit_temperature(z, scaled) == pytest.approx(fit_temperature(z, target), rel=fit_resolution())


def test_fit_is_a_minimum():
    z, g = _logits(4000, 6, 3, scale=4.0)
    y = torch.multinomial(torch.softmax(z / 3.0, -1), 1, generator=g).squeeze(1)
    t = fit_temperature(z, y)
    best = scaled_cross_entropy(z, y, t)
    assert best < scaled_cross_entropy(z, y, 1.0)
    assert best <= scaled_cross_entropy(z, y, t * 1.05) and best <= scaled_cross_entropy(z, y, t / 1.05)


def test_posterior_temperature_soft_and_hard():
    z, _ = _logits(2000, 10, 4)
    alpha = 20 * torch.softmax(z / 0.6, -1)  # a bank whose means are sharper than the model
    with pytest.warns(DeprecationWarning, match="posterior_temperature is deprecated"):
        assert posterior_temperature(z, alpha) == pytest.approx(0.6, rel=1e-3)
    # hard pseudo-labels (the bank's argmax = the model's argmax): the sharper the better, up to T_MIN
    with pytest.warns(DeprecationWarning):
        assert posterior_temperature(z, alpha, hard=True) < 0.1


@pytest.mark.parametrize("bad, err, match", [
    (lambda z: (z[0], torch.zeros(4, dtype=torch.long)), ValueError, "logits"),
    (lambda z: (z.long(), torch.zeros(4, dtype=torch.long)), ValueError, "floating"),
    (lambda z: (z[:0], torch.zeros(0, dtype=torch.long)), ValueError, "at least one"),
    (lambda z: (z.clone().fill_(float("nan")), torch.zeros(4, dtype=torch.long)), ValueError, "NaN"),
    (lambda z: (z, torch.tensor([0, 1, 2, 3])), IndexError, "label 3"),
    (lambda z: (z, torch.tensor([0, 1, -1, 0])), IndexError, "label -1"),
    (lambda z: (z, torch.zeros(5, dtype=torch.long)), ValueError, r"\[4\]"),
    (lambda z: (z, torch.zeros(4, 2)), ValueError, "soft targets"),
    (lambda z: (z, -torch.ones(4, 3)), ValueError, "non-negative"),
    (lambda z: (z, torch.zeros(4, 3)), ValueError, "positive sum"),
    (lambda z: (z, [0, 1, 2, 0]), TypeError, "tensor"),
])
def test_bad_input_is_named(bad, err, match):
    z = torch.randn(4, 3)
    logits, target = bad(z)
    with pytest.raises(err, match=match):
        fit_temperature(logits, target)


def test_posterior_temperature_needs_a_floating_bank():
    with pytest.raises(TypeError, match="posterior_means"), pytest.warns(DeprecationWarning):
        posterior_temperature(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


def _sym_transition(c, eta):
    return (1 - eta) * torch.eye(c, dtype=torch.float64) + eta / c


def test_fit_through_the_noise_recovers_the_clean_temperature():
    # true classes from softmax(z / 0.7), labels flipped by 40% symmetric noise: a plain fit
    # to the noisy labels gives a much flatter model; the fit through the transition does not
    z, g = _logits(40000, 10, 5)
    y = torch.multinomial(torch.softmax(z / 0.7, -1), 1, generator=g).squeeze(1)
    m = _sym_transition(10, 0.4)
    noisy = torch.multinomial(m[y], 1, generator=g).squeeze(1)
    assert fit_temperature(z, noisy) > 1.2
    assert abs(fit_temperature(z, noisy, transition=m) / 0.7 - 1) < 0.05


def test_bank_transition_counts_labels_per_posterior_argmax():
    means = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.2, 0.8, 0.0], [0.1, 0.9, 0.0]])
    labels = torch.tensor([0, 1, 1, 1])
    m = bank_transition(means, labels, smoothing=0.0)
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.equal(m, expected)  # class 2 never the argmax: identity row
    smoothed = bank_transition(means, labels, smoothing=1.0)
    assert torch.allclose(smoothed[0], torch.tensor([2, 2, 1], dtype=torch.float64) / 5)
    assert torch.allclose(smoothed.sum(1), torch.ones(3, dtype=torch.float64))


def test_bank_transition_recovers_symmetric_noise():
    g = torch.Generator().manual_seed(6)
    y = torch.randint(0, 10, (50000,), generator=g)
    m = _sym_transition(10, 0.4)
    noisy = torch.multinomial(m[y], 1, generator=g).squeeze(1)
    means = torch.nn.functional.one_hot(y, 10).double() * 0.9 + 0.01  # a bank that found the true classes
    assert torch.allclose(bank_transition(means, noisy), m, atol=0.02)


@pytest.mark.parametrize("m, match", [
    (torch.eye(4), r"\[3, 3\]"),
    (torch.full((3, 3), 0.5), "probability vectors"),
    (-torch.eye(3), "probability vectors"),
])
def test_bad_transition_is_named(m, match):
    with pytest.raises(ValueError, match=match):
        fit_temperature(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), transition=m)


def test_bank_transition_bad_input():
    with pytest.raises(TypeError, match="posterior_means"):
        bank_transition(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        bank_transition(torch.rand(3, 2), torch.rand(3, 2))
    with pytest.raises(IndexError, match="label 2"):
        bank_transition(torch.rand(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="smoothing"):
        bank_transition(torch.rand(3, 2), torch.tensor([0, 1, 1]), smoothing=-1)

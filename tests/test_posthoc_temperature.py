"""tools/posthoc_temperature.py: the temperature fit recovers a known temperature."""
import importlib.util
import os

import pytest
import torch

_PATH = os.path.join(os.path.dirname(__file__), "..", "tools", "posthoc_temperature.py")


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("posthoc_temperature", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("t_true", [0.4, 1.0, 2.5])
def test_fit_recovers_temperature(tool, t_true):
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(20000, 10, generator=g, dtype=torch.float64)
    # labels drawn from softmax(z / t_true): the NLL-optimal temperature is t_true
    y = torch.multinomial(torch.softmax(z / t_true, -1), 1, generator=g).squeeze(1)
    t = tool.fit_temperature(z, y)
    assert abs(t / t_true - 1) < 0.05, t


def test_fit_lowers_nll(tool):
    g = torch.Generator().manual_seed(1)
    z = 4 * torch.randn(5000, 5, generator=g)
    y = torch.multinomial(torch.softmax(z / 3.0, -1), 1, generator=g).squeeze(1)
    t = tool.fit_temperature(z, y)
    before = torch.nn.functional.cross_entropy(z, y)
    after = torch.nn.functional.cross_entropy(z / t, y)
    assert after < before


def test_noisy_heldout_labels(tool):
    import argparse

    y = torch.arange(10).repeat(500)
    clean = argparse.Namespace(noise="none", noise_rate=0.0, noise_seed=12345, dataset="fashion-mnist")
    assert torch.equal(tool.noisy_heldout_labels(clean, y, 10), y)
    sym = argparse.Namespace(noise="sym", noise_rate=0.4, noise_seed=12345, dataset="fashion-mnist")
    noisy = tool.noisy_heldout_labels(sym, y, 10)
    assert abs(float((noisy != y).double().mean()) - 0.36) < 0.03  # 40% redrawn, 1 in 10 lands right
    assert torch.equal(noisy, tool.noisy_heldout_labels(sym, y, 10))  # seeded


def test_no_clean_data_fits_through_the_bank(tool):
    # a model whose clean-label temperature is 0.7, noisy labels (40% symmetric), and a bank
    # that found the true classes of its training samples: the fit through the bank's
    # transition recovers 0.7, the plain fit to noisy labels does not
    g = torch.Generator().manual_seed(2)
    m = 0.6 * torch.eye(10, dtype=torch.float64) + 0.04

    def draw(n):
        z = 3 * torch.randn(n, 10, generator=g, dtype=torch.float64)
        y = torch.multinomial(torch.softmax(z / 0.7, -1), 1, generator=g).squeeze(1)
        return z, y, torch.multinomial(m[y], 1, generator=g).squeeze(1)

    z_val, _, noisy_val = draw(30000)
    z_tr, y_tr, noisy_tr = draw(30000)
    bank = torch.nn.functional.one_hot(y_tr, 10).double() + 0.05
    fits = tool.no_clean_data_fits(z_val, noisy_val, z_tr, bank / bank.sum(1, keepdim=True), noisy_tr)
    assert set(fits) == {"noisy_val", "posterior", "posterior_hard", "noisy_val_bank", "train_bank"}
    assert fits["noisy_val"] > 1.2
    assert abs(fits["noisy_val_bank"] / 0.7 - 1) < 0.06
    assert abs(fits["train_bank"] / 0.7 - 1) < 0.06
    assert tool.no_clean_data_fits(z_val, noisy_val).keys() == {"noisy_val"}

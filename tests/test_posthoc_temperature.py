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

"""SupCon fwd+bwd on CPU (two views, hard labels): time and peak extra memory."""
import pytest
import torch

from common import PROVIDERS, supcon_bytes, supcon_fn, supcon_peak_extra_bytes


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("m", [2048, 8192])
def test_supcon(benchmark, m, provider):
    d = 128
    f = torch.randn(2, m // 2, d).requires_grad_(True)
    labels = torch.randint(0, 100, (m // 2,))
    fn = supcon_fn(provider)

    def step():
        f.grad = None
        fn(f, labels).backward()

    for _ in range(2):
        step()
    benchmark.group = f"supcon M{m} d{d}"
    benchmark.extra_info.update(op="supcon", provider=provider, M=m, d=d, bytes=supcon_bytes(m, d),
                                threads=torch.get_num_threads(),
                                peak_extra_bytes=supcon_peak_extra_bytes(provider, m, d))
    benchmark.pedantic(step, rounds=5 if m > 4096 else 10, warmup_rounds=1)

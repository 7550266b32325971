"""Soft-target CE fwd+bwd on CPU at (4096, 1000)."""
import pytest
import torch

from common import PROVIDERS, soft_ce_bytes, soft_ce_fn


@pytest.mark.parametrize("provider", PROVIDERS)
def test_soft_ce(benchmark, provider):
    b, c = 4096, 1000
    z = torch.randn(b, c).requires_grad_(True)
    t = torch.softmax(torch.randn(b, c), -1)
    fn = soft_ce_fn(provider)

    def step():
        z.grad = None
        fn(z, t).backward()

    for _ in range(3):
        step()
    benchmark.group = "soft_ce B4096 C1000"
    benchmark.extra_info.update(op="soft_ce", provider=provider, B=b, C=c, bytes=soft_ce_bytes(b, c),
                                threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=15, warmup_rounds=1)

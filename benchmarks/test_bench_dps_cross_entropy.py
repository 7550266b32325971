"""DPS step fwd+bwd on CPU: eager reference vs torch.compile(reference) vs fused C++."""
import pytest
import torch

import dps_fast
from common import PROVIDERS, dps_bytes, dps_fn

SHAPES = [(128, 10, 50_000), (256, 100, 50_000), (1024, 1000, 200_000), (4096, 1000, 100_000)]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}-C{c}-N{n}" for b, c, n in SHAPES])
def test_dps_step(benchmark, shape, provider):
    b, c, n = shape
    gen = torch.Generator().manual_seed(b + c)
    alpha = dps_fast.init_prior(torch.randint(0, c, (n,), generator=gen), c)
    z = torch.randn(b, c, generator=gen).requires_grad_(True)
    fn = dps_fn(provider)

    # random rows of the bank, drawn outside the timed region
    pool = [torch.randperm(n, generator=gen)[:b] for _ in range(8)]
    it = iter(range(10 ** 9))

    def setup():
        return (pool[next(it) % len(pool)],), {}

    def step(idx):
        z.grad = None
        fn(z, idx, alpha).backward()

    for k in range(3):
        step(pool[k])  # warm-up (and compilation for the compile provider)
    benchmark.group = f"dps B{b} C{c} N{n}"
    benchmark.extra_info.update(op="dps", provider=provider, B=b, C=c, N=n, bytes=dps_bytes(b, c),
                                threads=torch.get_num_threads())
    benchmark.pedantic(step, setup=setup, rounds=60 if b * c < 1e6 else 20, warmup_rounds=1)

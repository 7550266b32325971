"""DPS step fwd+bwd on CPU: the fused C++ step against the reference (eager and
torch.compile'd) and against the step written by hand (eager and torch.compile'd),
all in one process."""
import pytest
import torch

import dps_fast
from common import DPS_PROVIDERS, dps_bytes, dps_fn

F32, BF16 = torch.float32, torch.bfloat16
# (B, C, N, logits dtype, bank dtype)
CASES = [(128, 10, 50_000, F32, F32), (256, 100, 50_000, F32, F32), (1024, 1000, 200_000, F32, F32),
         (4096, 1000, 100_000, F32, F32), (4096, 1000, 100_000, F32, BF16), (4096, 1000, 100_000, BF16, F32)]


def case_id(case):
    b, c, n, zdt, adt = case
    tail = "".join(f"-{name}_bf16" for name, dt in (("logits", zdt), ("bank", adt)) if dt == BF16)
    return f"B{b}-C{c}-N{n}{tail}"


@pytest.mark.parametrize("provider", DPS_PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_dps_step(benchmark, case, provider):
    b, c, n, zdt, adt = case
    gen = torch.Generator().manual_seed(b + c)
    alpha = dps_fast.init_prior(torch.randint(0, c, (n,), generator=gen), c, dtype=adt)
    z = torch.randn(b, c, generator=gen).to(zdt).requires_grad_(True)
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
        step(pool[k])  # warm-up (and compilation for the compiled providers)
    benchmark.group = "dps " + case_id(case).replace("-", " ")
    nbytes = dps_bytes(b, c, z_bytes=z.element_size(), a_bytes=alpha.element_size())
    benchmark.extra_info.update(op="dps", provider=provider, B=b, C=c, N=n, bytes=nbytes,
                                logits_dtype=str(zdt)[6:], bank_dtype=str(adt)[6:],
                                threads=torch.get_num_threads())
    benchmark.pedantic(step, setup=setup, rounds=60 if b * c < 1e6 else 20, warmup_rounds=1)

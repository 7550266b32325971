"""Read-outs of the posterior (issue 23): one index rule for every read-out (ids or a bool
mask [N], checked alike), the training step's index integer-only, and posterior_readouts'
scratch bounded in bytes at any C."""
import json
import re
import subprocess
import sys

import pytest
import torch

import dps_fast
from dps_fast import functional as F
from dps_fast import reference as R
from dps_fast import soft_labels as S

N, C = 9, 4
MASK = torch.tensor([False, True, False, False, True, False, False, False, True])
IDS = torch.tensor([1, 4, 8])


def trained(kind="local", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    loss = dps_fast.DPSLoss(torch.randint(0, C, (N,), generator=g), C, c=5.0, eps=0.1, bank=kind, bank_dtype=dtype)
    for _ in range(3):
        loss(2 * torch.randn(N, C, generator=g), torch.arange(N))
    return loss


@pytest.fixture(scope="module")
def soft(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("soft") / "soft.safetensors")
    S.export_soft_labels(trained(), path, dtype=torch.float32)
    return S.load_soft_labels(path)


def _readouts(loss, soft):
    """Every read-out that takes an index, as name -> fn(index) -> tensor."""
    return {"DPSLoss.targets": loss.targets, "DPSLoss.posterior": lambda i: loss.posterior(i)["label_error"],
            "SoftLabels.targets": soft.targets, "SoftLabels.prior": lambda i: soft.prior(index=i)}


@pytest.mark.parametrize("kind", ["local", "host"])
def test_a_bool_mask_is_read_as_a_mask_everywhere(kind, soft):
    """A bool mask [N] selects its True rows (it was read as the ids 0 and 1: N rows back)."""
    for name, fn in _readouts(trained(kind), soft).items():
        got = fn(MASK)
        assert got.shape[0] == 3, name
        assert torch.equal(got, fn(IDS)), name
        assert torch.equal(fn(MASK.tolist()), got), name  # a list of bools is a mask too
        assert fn(torch.zeros(N, dtype=torch.bool)).shape[0] == 0, name


def test_masks_of_another_length_and_bad_ids_are_refused_alike(soft):
    for name, fn in _readouts(trained(), soft).items():
        for bad in (MASK[:-1], torch.cat([MASK, MASK]), MASK[None]):
            msg = re.escape(f"one entry per sample: got shape {list(bad.shape)} for {N} samples")
            with pytest.raises(ValueError, match=msg):
                fn(bad)
        for ids in ([N], [-1], [0, 2 * N]):  # a negative id is refused, not wrapped to the last row
            with pytest.raises(IndexError, match=f"out of range for a bank of {N} rows"):
                fn(torch.tensor(ids))
        with pytest.raises(TypeError, match="integer sample ids or a bool mask"):
            fn(IDS.float())
        with pytest.raises(ValueError, match="1-D tensor of ids"):
            fn(IDS[None])


def test_the_training_step_index_stays_integer_only():
    """The step's index is ids only: a bool mask there is a clear TypeError, in forward and in
    the host bank's prefetch (which read it as the ids 0 and 1)."""
    loss = trained()
    with pytest.raises(TypeError, match="index must be an integer tensor, got dtype torch.bool"):
        loss(torch.randn(N, C), torch.ones(N, dtype=torch.bool))
    host = dps_fast.HostDPSLoss(torch.zeros(N, dtype=torch.long), C)
    with pytest.raises(TypeError, match="a mask is not an index here"):
        host.prefetch(MASK)
    with pytest.raises(TypeError, match="a mask is not an index here"):
        dps_fast._validate.canonical_index(MASK)
    uint8 = torch.tensor([1, 4, 8], dtype=torch.uint8)  # uint8 stays ids (not a PyTorch mask)
    assert torch.equal(loss.targets(uint8), loss.targets(IDS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_posterior_readouts_match_the_reference(dtype):
    g = torch.Generator().manual_seed(2)
    for n, c in ((300, 7), (5, 1), (3, 2)):
        alpha = (torch.rand(n, c, generator=g) * 40 + 1e-3).to(dtype)
        labels = torch.randint(0, c, (n,), generator=g)
        want = R.posterior_readouts(alpha, labels)
        before = alpha.clone()
        for cap in (None, 1, 13, 10 ** 9):
            got = F.posterior_readouts(alpha, labels, chunk_rows=cap)
            assert set(got) == set(want)
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=2e-6, atol=2e-7, msg=f"{k} at cap {cap}")
        assert torch.equal(alpha, before)  # the float64 bank is not used as scratch
        assert "mean" not in F.posterior_readouts(alpha, None, mean=False)
    with pytest.raises(ValueError, match="chunk_rows"):
        F.posterior_readouts(alpha, labels, chunk_rows=0)


def test_readout_chunks_are_bounded_in_bytes_at_any_c():
    for c in (1, 2, 1000, 65536, 10 ** 6, 10 ** 9):
        rows = F.readout_chunk_rows(c)
        assert rows >= 1 and (rows == 1 or rows * c * 8 * 2 <= F.READOUT_SCRATCH_BYTES), c
        assert F.readout_chunk_rows(c, chunk_rows=3) <= 3
    assert F.readout_chunk_rows(1000) * 1000 * 8 * 2 <= 64 * 2 ** 20  # rows of 65,536 were 1 GB at C = 1000


_PEAK = """
import json, resource, torch, dps_fast
torch.set_num_threads(1)
n, c = 20000, 1000
labels = torch.randint(0, c, (n,))
crit = dps_fast.DPSLoss(labels, c)
crit.alpha.add_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = crit.posterior()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2 ** 10))
"""


def test_posterior_peak_memory_is_the_output_plus_bounded_scratch():
    """20,000 x 1000: the float32 mean is 80 MB; rows of 65,536 made 5 float64 temporaries of
    160 MB each (+0.8 GB); the bounded scratch adds about 32 MiB."""
    done = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    grew_mb = json.loads(done.stdout.strip().splitlines()[-1])
    assert grew_mb < 80 + 120, grew_mb

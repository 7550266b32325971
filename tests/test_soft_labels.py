"""dps_fast.soft_labels: export of the posterior as safetensors soft labels, and back."""
import os

import pytest
import torch

import dps_fast
from dps_fast import soft_labels as S


@pytest.fixture(scope="module")
def loss():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (50,), generator=g)
    loss = dps_fast.DPSLoss(labels, 7, c=10.0, eps=0.05, gamma=0.9)
    for _ in range(12):
        loss(3 * torch.randn(50, 7, generator=g), torch.arange(50))
    return loss


def test_dense_round_trip_float32(loss, tmp_path):
    path = str(tmp_path / "soft.safetensors")
    info = S.export_soft_labels(loss, path, dtype=torch.float32, epoch=12, c=10.0, eps=0.05)
    soft = S.load_soft_labels(path)
    assert info["bytes"] == os.path.getsize(path)
    torch.testing.assert_close(soft.targets(), loss.targets(), rtol=0, atol=1e-7)
    torch.testing.assert_close(soft.prior(), loss.alpha, rtol=1e-6, atol=1e-6)
    assert torch.equal(soft.given_labels, loss.given_labels)
    m = soft.meta
    assert (m["N"], m["C"], m["top_k"], m["epoch"], m["dtype"]) == ("50", "7", "dense", "12", "float32")
    assert float(m["gamma"]) == 0.9 and float(m["c"]) == 10.0 and float(m["eps"]) == 0.05
    idx = torch.tensor([3, 0, 49])
    assert torch.equal(soft.targets(idx), soft.targets()[idx])


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_dense_round_trip_half(loss, tmp_path, dtype, tol):
    path = str(tmp_path / "soft.safetensors")
    S.export_soft_labels(loss, path, dtype=dtype)
    soft = S.load_soft_labels(path)
    torch.testing.assert_close(soft.targets(), loss.targets(), rtol=0, atol=tol)
    assert soft.meta["dtype"] == str(dtype).replace("torch.", "")


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_keeps_the_largest_masses_and_conserves_mass(loss, tmp_path, k, dtype):
    path = str(tmp_path / "topk.safetensors")
    S.export_soft_labels(loss, path, top_k=k, dtype=dtype)
    soft = S.load_soft_labels(path)
    t, got = loss.targets(), soft.targets()
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    raw, _ = S.read_safetensors(path)  # the stored masses plus the remainder conserve the mass
    stored = raw["topk_values"].float().sum(1) + raw["remainder"].float()
    torch.testing.assert_close(stored, torch.ones(50), rtol=0, atol=1e-6 if dtype == torch.float32 else 5e-4)
    torch.testing.assert_close(got.sum(1), torch.ones(50), rtol=0, atol=1e-6)
    vals, idx = t.topk(k, 1)
    torch.testing.assert_close(got.gather(1, idx), vals, rtol=0, atol=tol)
    if k < 7:
        rest = got.scatter(1, idx, float("nan"))
        rest = rest[~rest.isnan()].view(50, 7 - k)
        want = (1 - vals.sum(1, keepdim=True)) / (7 - k)  # the remainder, spread evenly
        torch.testing.assert_close(rest, want.expand_as(rest), rtol=0, atol=tol)
    else:
        torch.testing.assert_close(got, t, rtol=0, atol=tol)


def test_reference_reader_agrees(loss, tmp_path):
    st = pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    for top_k, dtype in ((None, torch.bfloat16), (3, torch.float16)):
        path = str(tmp_path / f"ref{top_k}.safetensors")
        S.export_soft_labels(loss, path, top_k=top_k, dtype=dtype, epoch=4)
        ours, meta = S.read_safetensors(path)
        theirs = load_file(path)
        assert set(ours) == set(theirs)
        for name in ours:
            assert theirs[name].dtype == ours[name].dtype and torch.equal(theirs[name], ours[name]), name
        with st.safe_open(path, "pt") as f:
            assert f.metadata() == meta and meta["format"] == S.FORMAT


def test_chunked_export_writes_the_same_bytes(loss, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for top_k in (None, 2):
        S.export_soft_labels(loss, a, top_k=top_k)
        S.export_soft_labels(loss.alpha, b, top_k=top_k, given_labels=loss.given_labels, gamma=loss.gamma, c=loss.c, eps=loss.eps,
                             chunk_rows=6)
        assert open(a, "rb").read() == open(b, "rb").read()


def test_bytes_per_sample_at_imagenet_width(tmp_path):
    """FKD / ReLabel-style storage at C = 1000: float16 masses, int16 class ids."""
    labels = torch.arange(64) % 1000
    bank = dps_fast.init_prior(labels, 1000) + torch.rand(64, 1000)
    got = {}
    for k in (1, 5, 10, None):
        info = S.export_soft_labels(bank, str(tmp_path / f"k{k}"), top_k=k, given_labels=labels)
        got[k] = info["bytes_per_sample"]
    # k values + k ids (2 B each), remainder, alpha0 and the given label (2 B each)
    assert got == {1: 10.0, 5: 26.0, 10: 46.0, None: 2004.0}


def test_prior_and_distillation_from_loaded_labels(loss, tmp_path):
    path = str(tmp_path / "p.safetensors")
    S.export_soft_labels(loss, path, top_k=2)
    soft = S.load_soft_labels(path)
    prior = soft.prior(concentration=20.0)
    assert bool((prior > 0).all())
    torch.testing.assert_close(prior.sum(1), torch.full((50,), 20.0), rtol=1e-3, atol=0)
    student = dps_fast.DPSLoss(prior=prior)
    torch.testing.assert_close(student.targets(), soft.targets(), rtol=0, atol=1e-5)
    logits = torch.randn(8, 7, requires_grad=True)
    out = dps_fast.soft_cross_entropy(logits, soft.targets(torch.arange(8)))
    out.backward()
    want = torch.nn.functional.cross_entropy(logits.detach(), soft.targets(torch.arange(8)))
    torch.testing.assert_close(out.detach(), want)


def test_bad_input_raises_before_writing(loss, tmp_path):
    path = str(tmp_path / "never.safetensors")
    with pytest.raises(ValueError, match="dtype must be"):
        S.export_soft_labels(loss, path, dtype=torch.int32)
    with pytest.raises(ValueError, match="top_k must be"):
        S.export_soft_labels(loss, path, top_k=0)
    with pytest.raises(ValueError, match="top_k must be"):
        S.export_soft_labels(loss, path, top_k=8)
    with pytest.raises(ValueError, match="labels has 3 entries for a bank of 50 rows"):
        S.export_soft_labels(loss.alpha, path, given_labels=torch.tensor([0, 1, 2]))
    assert not os.path.exists(path) and os.listdir(tmp_path) == []
    other = str(tmp_path / "other.safetensors")
    with open(other, "wb") as f:
        head, _ = S._header([("x", torch.float32, [2])], {"format": "something-else"})
        f.write(head + S._raw(torch.zeros(2)))
    with pytest.raises(ValueError, match="not a dps_fast soft-label file"):
        S.load_soft_labels(other)
    with open(other, "wb") as f:
        f.write(b"\x00\x10")
    with pytest.raises(ValueError, match="not a safetensors file"):
        S.load_soft_labels(other)

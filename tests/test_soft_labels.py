"""dps_fast.soft_labels: export of the posterior as safetensors soft labels, and back."""
import contextlib
import json
import os
import re
import struct

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
    # k values + k ids (2 B each), remainder and given label (2 B each), alpha0 (float32: 4 B)
    assert got == {1: 12.0, 5: 28.0, 10: 48.0, None: 2006.0}


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


# --- issue 23: no export, load or read-out loses, mixes or corrupts the posterior ---


def _header_and_data(path):
    raw = open(path, "rb").read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + hlen]), raw[8 + hlen:]


def _write_with_header(path, header, data, raw_header=None):
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + data)


def _write_tensors(path, tensors, meta):
    """A safetensors file of exactly these tensors (any values), in this order."""
    specs = [(k, v.dtype, list(v.shape)) for k, v in tensors.items()]
    head, _ = S._header(specs, meta)
    with open(path, "wb") as f:
        f.write(head + b"".join(S._raw(v) for v in tensors.values()))


@contextlib.contextmanager
def _raises_naming(path, exc, problem):
    """One-line error that names the file and the problem."""
    with pytest.raises(exc, match=re.escape(str(path)) + ".*" + problem) as info:
        yield info
    assert "\n" not in str(info.value)


def test_alpha0_above_float16_range_survives_the_default_export(tmp_path):
    """alpha0 of 1e5 was written as float16 inf (and prior() of the file refused); it is
    stored in float32 whatever dtype the masses use."""
    labels = torch.arange(20) % 5
    bank = dps_fast.init_prior(labels, 5) * 1e5 + torch.rand(20, 5)
    for top_k in (None, 2):
        path = str(tmp_path / f"big{top_k}.safetensors")
        S.export_soft_labels(bank, path, top_k=top_k, given_labels=labels)
        soft = S.load_soft_labels(path)
        assert soft._t["alpha0"].dtype == torch.float32
        torch.testing.assert_close(soft.alpha0, bank.sum(1), rtol=1e-6, atol=0)
        prior = soft.prior()
        assert bool(torch.isfinite(prior).all()) and bool((prior > 0).all())
        torch.testing.assert_close(prior.sum(1), bank.sum(1), rtol=2e-3, atol=0)


def _edit(header, name, key, value):
    e = json.loads(json.dumps(header))
    e[name][key] = value
    return e


def _corrupt_layouts(header, data):
    """(name, header (a dict, or raw bytes), data, expected problem) of broken layouts."""
    t_lo, t_hi = header["targets"]["data_offsets"]
    past = [o + len(data) for o in header["given_labels"]["data_offsets"]]
    dup = json.dumps(header)[:-1] + ', "alpha0": ' + json.dumps(header["alpha0"]) + "}"
    return [
        ("truncated", header, data[:-10], "past the end of the data"),
        ("dtype", _edit(header, "targets", "dtype", "Q8"), data, "unknown dtype 'Q8'"),
        ("shape", _edit(header, "targets", "shape", [50, 6]), data, "needs 600 bytes"),
        ("empty offsets", _edit(header, "alpha0", "data_offsets", [0, 0]), data, "needs 200 bytes"),
        ("overlap", _edit(header, "alpha0", "data_offsets", [t_lo, t_lo + 200]), data, "overlaps tensor"),
        ("offsets past the file", _edit(header, "given_labels", "data_offsets", past), data,
         "'given_labels' has data_offsets .* past the end of the data"),
        ("reversed offsets", _edit(header, "targets", "data_offsets", [t_hi, t_lo]), data, r"not \[start, end\]"),
        ("trailing bytes", header, data + b"\0" * 8, "8 bytes follow the last tensor"),
        ("metadata", _edit(header, "__metadata__", "N", 50), data, "__metadata__ must map strings"),
        ("not JSON", b"{not json       ", data, "not valid JSON"),
        ("duplicate name", dup.encode(), data, "'alpha0' appears twice"),
    ]


def test_every_corrupt_layout_is_refused_naming_file_and_problem(loss, tmp_path):
    """A truncated file, offsets out of the file or overlapping, an empty range for a
    non-empty shape, a shape that does not fit its bytes, a bad header: each used to load
    garbage or raise an error without the file's name."""
    good = str(tmp_path / "good.safetensors")
    S.export_soft_labels(loss, good)
    header, data = _header_and_data(good)
    for name, head, body, problem in _corrupt_layouts(header, data):
        path = tmp_path / f"bad-{name.replace(' ', '-')}.safetensors"
        _write_with_header(path, head if isinstance(head, dict) else None, body,
                           raw_header=head if isinstance(head, bytes) else None)
        with _raises_naming(path, ValueError, problem):
            S.load_soft_labels(str(path))


def test_header_length_and_missing_file_errors_name_the_file(tmp_path):
    path = tmp_path / "hlen.safetensors"
    for hlen, problem in ((1 << 40, "exceeds the safetensors limit"), (64, "runs past the end of the file")):
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", hlen) + b"{}")
        with _raises_naming(path, ValueError, problem):
            S.load_soft_labels(str(path))
    with _raises_naming(tmp_path / "absent", FileNotFoundError, "no such"):
        S.load_soft_labels(str(tmp_path / "absent"))
    with _raises_naming(tmp_path, ValueError, "is a directory"):
        S.load_soft_labels(str(tmp_path))


def _bad_values(t, k):
    """(name, edit of the tensors, expected problem); t holds a file's tensors."""
    if k is None:
        yield "nan", lambda x: x["targets"][3].__setitem__(1, float("nan")), "targets row 3 holds NaN"
        yield "negative", lambda x: x["targets"][4].__setitem__(slice(0, 2), torch.tensor([1.25, -0.25])), \
            "targets row 4 holds the negative mass -0.25"
        yield "half", lambda x: x["targets"][5].mul_(0.5), r"targets row 5 sums to 0\.49"
    else:
        yield "id = C", lambda x: x["topk_indices"][2].__setitem__(0, 7), r"topk_indices row 2 .* outside \[0, 7\)"
        yield "id < 0", lambda x: x["topk_indices"][6].__setitem__(1, -1), "topk_indices row 6 .* -1"
        yield "repeated id", lambda x: x["topk_indices"][8].__setitem__(1, int(x["topk_indices"][8, 0])), \
            "topk_indices row 8 repeats a class id"
        yield "nan remainder", lambda x: x["remainder"].__setitem__(9, float("nan")), "remainder row 9 holds NaN"
        yield "mass lost", lambda x: x["remainder"].__setitem__(1, 0.0) if float(x["remainder"][1]) > 0.3 else \
            x["topk_values"][1].mul_(0.5), "row 1 sums to"
    big = torch.where(torch.arange(50) == 7, 1e5, 1.0)  # alpha0 ~ 1e6 in row 7: inf in float16, as written before
    yield "alpha0 inf", lambda x: x.__setitem__("alpha0", (x["alpha0"] * big).half()), \
        "alpha0 row 7 is inf.*export again"
    yield "alpha0 0", lambda x: x["alpha0"].__setitem__(0, 0.0), "alpha0 row 0 is 0.0"
    yield "label = C", lambda x: x["given_labels"].__setitem__(11, 7), r"given_labels row 11 .* outside \[0, 7\)"
    yield "shape vs metadata", lambda x: x.__setitem__("alpha0", x["alpha0"][:49].clone()), \
        r"'alpha0' has shape \[49\], but the metadata"
    yield "float ids", lambda x: x.__setitem__("given_labels", x["given_labels"].float()), "must hold integers"


@pytest.mark.parametrize("top_k", [None, 3])
def test_every_bad_value_is_refused_naming_file_row_and_problem(loss, tmp_path, top_k, monkeypatch):
    """NaN, negative or lost mass, top-k ids outside [0, C) or repeated, a non-finite
    alpha0 (float16 overflow in files of the old layout), labels out of range: each used
    to load silently into NaN targets, a wrong prior or an index error later. (Checked
    3 rows at a time here, so that the rows named lie in later chunks.)"""
    monkeypatch.setattr(S, "_CHECK_ELEMENTS", 3 * (top_k or 7))
    good = str(tmp_path / "good.safetensors")
    S.export_soft_labels(loss, good, top_k=top_k)
    t, meta = S.read_safetensors(good)
    for name, edit, problem in _bad_values(t, top_k):
        bad = {k: v.clone() for k, v in t.items()}
        edit(bad)
        path = tmp_path / f"bad-{name.replace(' ', '-')}.safetensors"
        _write_tensors(path, bad, meta)
        with _raises_naming(path, ValueError, problem):
            S.load_soft_labels(str(path))


def test_metadata_that_cannot_describe_the_tensors_is_refused(loss, tmp_path):
    good = str(tmp_path / "good.safetensors")
    S.export_soft_labels(loss, good)
    t, meta = S.read_safetensors(good)
    for edit, problem in (({"N": "fifty"}, "must give integers N, C"), ({"top_k": "9"}, "top_k in \\[1, C\\]"),
                          ({"C": "0"}, "C >= 1")):
        path = tmp_path / "meta.safetensors"
        _write_tensors(path, t, {**meta, **edit})
        with _raises_naming(path, ValueError, problem):
            S.load_soft_labels(str(path))


class _DistributedRows:
    """Stands for a DistributedDPSLoss of the given mode (export refuses it before any row)."""

    def __init__(self, mode):
        self.mode, self.world, self.num_samples, self.num_classes = mode, 2, 4, 3

    def iter_rows(self, chunk_rows):
        raise AssertionError("must not be read")


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_distributed_export_message_names_the_banks_kind(tmp_path, mode):
    path = str(tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match=f"{re.escape(path)}.*a {mode} bank over 2 ranks") as e:
        S.export_soft_labels(_DistributedRows(mode), path)
    other = {"replicated": "sharded", "sharded": "replicated"}[mode]
    assert other not in str(e.value)
    assert not os.path.exists(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_export_refuses_a_bank_row_that_is_not_a_dirichlet_parameter(tmp_path, value):
    bank = torch.rand(10, 4) + 0.1
    bank[6, 2] = value
    path = str(tmp_path / "x.safetensors")
    with _raises_naming(path, ValueError, "bank row 6 is not a Dirichlet parameter"):
        S.export_soft_labels(bank, path, chunk_rows=4)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("top_k", [1, 3, 4])
def test_a_top_k_bank_exports_from_its_compressed_rows(tmp_path, top_k, monkeypatch):
    """DPSLoss(top_k=4): an export of at most 4 masses is read from (ids, values, rest), never
    from implied dense rows, and equals the export of the same rows densified."""
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 40, (60,), generator=g)
    crit = dps_fast.DPSLoss(labels, 40, c=10.0, gamma=0.9, top_k=4)
    for _ in range(6):
        crit(3 * torch.randn(60, 40, generator=g), torch.arange(60))
    dense = str(tmp_path / "dense.safetensors")
    S.export_soft_labels(crit.full_bank(), dense, top_k=top_k, dtype=torch.float32, given_labels=labels)
    monkeypatch.setattr(crit.store, "iter_rows", lambda *a: pytest.fail("the export densified the top-k rows"))
    path = str(tmp_path / "topk.safetensors")
    S.export_soft_labels(crit, path, top_k=top_k, dtype=torch.float32, chunk_rows=16)
    got, want = S.read_safetensors(path)[0], S.read_safetensors(dense)[0]
    assert got.keys() == want.keys()
    for name in ("topk_values", "remainder", "alpha0"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)
    assert torch.equal(got["given_labels"], want["given_labels"])
    above = got["topk_values"] > got["remainder"][:, None] / (40 - top_k) * 1.001  # not tied with the rest's level
    assert torch.equal(got["topk_indices"][above], want["topk_indices"][above])
    monkeypatch.undo()
    more = str(tmp_path / "more.safetensors")  # more masses than the bank keeps: from the implied dense rows
    S.export_soft_labels(crit, more, top_k=6, dtype=torch.float32)
    S.export_soft_labels(crit.full_bank(), dense, top_k=6, dtype=torch.float32)
    torch.testing.assert_close(S.read_safetensors(more)[0]["topk_values"], S.read_safetensors(dense)[0]["topk_values"])

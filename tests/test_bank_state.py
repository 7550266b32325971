"""The bank as the user's training state (issue 23): every ``load_state_dict`` verifies before
it writes, module casts keep the bank's dtype, and the bank is built in bounded memory.
Parametrized over the bank kinds; replicated and sharded run on a one-rank gloo group."""
import os

import pytest
import torch
import torch.distributed as dist

import dps_fast
from dps_fast import prior
from _ranks import spawn_ranks

N, C = 12, 5
KINDS = ("local", "host", "replicated", "sharded")
ROWS_KEY = {"local": "alpha", "host": "bank", "replicated": "bank", "sharded": "bank"}


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    """A one-rank gloo process group for the distributed kinds, torn down after this module."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(params=KINDS)
def kind(request):
    if request.param in ("replicated", "sharded"):
        request.getfixturevalue("gloo")
    return request.param


def labels_a():
    return torch.arange(N) % C


def labels_b():
    return (torch.arange(N) * 2 + 1) % C


def trained(kind, labels, dtype=torch.float32, steps=2):
    """A loss whose bank has moved away from its prior."""
    torch.manual_seed(0)
    m = dps_fast.DPSLoss(labels, C, bank=kind, c=4.0, eps=0.5, bank_dtype=dtype)
    for _ in range(steps):
        m(torch.randn(N, C) * 3, torch.randperm(N))
    return m


def snapshot(m):
    return m.alpha.clone(), m.given_labels.clone()


def assert_unchanged(m, before):
    alpha, lab = before
    assert m.alpha.dtype == alpha.dtype and torch.equal(m.alpha.view(torch.uint8), alpha.view(torch.uint8))
    assert m.given_labels.dtype == lab.dtype and torch.equal(m.given_labels, lab)


# --------------------------------------------------------------------------- good loads
def test_round_trip_restores_bank_and_labels(kind):
    src = trained(kind, labels_a())
    dst = dps_fast.DPSLoss(labels_b(), C, bank=kind, c=4.0, eps=0.5)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.alpha, src.alpha)
    assert torch.equal(dst.given_labels, labels_a())  # labels are state too (host and distributed lost them)
    z, idx = torch.randn(4, C), torch.tensor([3, 0, 7, 11])
    assert torch.equal(dst(z, idx), src(z, idx))


@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_state_of_another_dtype_loads_converted(kind, dst_dtype):
    src = trained(kind, labels_a(), dtype=torch.float64)
    sd = src.state_dict()
    sd["given_labels"] = sd["given_labels"].to(torch.int32)
    sd[ROWS_KEY[kind]] = sd[ROWS_KEY[kind]].clone().requires_grad_()  # e.g. a bank read off a graph
    dst = dps_fast.DPSLoss(labels_b(), C, bank=kind, c=4.0, eps=0.5, bank_dtype=dst_dtype)
    dst.load_state_dict(sd)
    assert dst.alpha.dtype == dst_dtype and torch.equal(dst.alpha, src.alpha.to(dst_dtype))
    assert not dst.alpha.requires_grad and dst.alpha.grad_fn is None
    assert dst.given_labels.dtype == torch.int64 and torch.equal(dst.given_labels, labels_a())


def test_missing_given_labels_keeps_the_labels(kind):
    sd = trained(kind, labels_a()).state_dict()
    del sd["given_labels"]  # a checkpoint of an older version
    dst = dps_fast.DPSLoss(labels_b(), C, bank=kind, c=4.0, eps=0.5)
    dst.load_state_dict(sd)  # strict: given_labels is optional
    assert torch.equal(dst.alpha, sd[ROWS_KEY[kind]]) and torch.equal(dst.given_labels, labels_b())


@pytest.mark.parametrize("strict", [True, False])
def test_labels_without_rows_raise_and_write_nothing(kind, strict):
    """Labels of one run over the rows of another would mix two states: refused, strict or
    not; strict also reports the missing rows, as nn.Module does."""
    dst = dps_fast.DPSLoss(labels_b(), C, bank=kind, c=4.0, eps=0.5)
    before = snapshot(dst)
    with pytest.raises(RuntimeError, match="given_labels: saved without the rows") as info:
        dst.load_state_dict({"given_labels": labels_a()}, strict=strict)
    assert (f'Missing key(s) in state_dict: "{ROWS_KEY[kind]}"' in str(info.value)) == strict
    assert_unchanged(dst, before)


# --------------------------------------------------------------------------- bad loads
def _rows(value):
    def edit(sd, key):
        sd[key] = sd[key].clone()
        sd[key][N // 2, 1] = value
    return edit


def _labels(fn):
    def edit(sd, key):
        sd["given_labels"] = fn(sd["given_labels"])
    return edit


def _set_label(value):
    def fn(lab):
        lab = lab.clone()
        lab[3] = value
        return lab
    return _labels(fn)


BAD = {
    "labels_one": (_labels(lambda lab: lab[:1]), "given_labels: shape"),
    "labels_short": (_labels(lambda lab: lab[:-1]), "given_labels: shape"),
    "labels_long": (_labels(lambda lab: torch.cat([lab, lab[:1]])), "given_labels: shape"),
    "labels_column": (_labels(lambda lab: lab[:, None]), "given_labels: shape"),
    "labels_float": (_labels(lambda lab: lab.float()), "given_labels: dtype"),
    "labels_bool": (_labels(lambda lab: lab > 0), "given_labels: dtype"),
    "labels_not_tensor": (_labels(lambda lab: lab.tolist()), "given_labels must be a torch.Tensor"),
    "label_too_high": (_set_label(C), "out of range"),
    "label_negative": (_set_label(-1), "out of range"),
    "rows_zero": (_rows(0.0), "finite and > 0"),
    "rows_negative": (_rows(-1.0), "finite and > 0"),
    "rows_nan": (_rows(float("nan")), "finite and > 0"),
    "rows_inf": (_rows(float("inf")), "finite and > 0"),
    "rows_overflow_fp16": (_rows(1e5), "finite and > 0 in the bank dtype torch.float16"),
    "rows_flush_to_zero_fp16": (_rows(1e-8), "finite and > 0 in the bank dtype torch.float16"),
    "rows_shape": (lambda sd, key: sd.__setitem__(key, torch.cat([sd[key], sd[key][:1]])), "saved shape"),
    "rows_integer": (lambda sd, key: sd.__setitem__(key, sd[key].round().to(torch.int64) + 1), "floating-point"),
}


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_load_raises_and_leaves_bank_and_labels_bit_identical(kind, bad, strict):
    """The saved bank is valid and differs from the target's (labels too), except for one
    defect: the load must raise naming it and write nothing, strict or not."""
    sd = trained(kind, labels_a(), steps=3).state_dict()
    edit, message = BAD[bad]
    edit(sd, ROWS_KEY[kind])
    dst = trained(kind, labels_b(), dtype=torch.float16, steps=1)
    before = snapshot(dst)
    with pytest.raises(RuntimeError, match=message):
        dst.load_state_dict(sd, strict=strict)
    assert_unchanged(dst, before)


# --------------------------------------------------------------------------- casts
class _Model(torch.nn.Module):
    def __init__(self, crit):
        super().__init__()
        self.lin, self.crit = torch.nn.Linear(3, C), crit


CASTS = {
    "half": lambda m: m.half(),
    "double": lambda m: m.double(),
    "bfloat16": lambda m: m.to(torch.bfloat16),
    "cpu_and_half": lambda m: m.to("cpu", torch.float16),
    "parent_half": lambda m: _Model(m).half().crit,
}


@pytest.mark.parametrize("cast", sorted(CASTS))
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_module_cast_keeps_the_bank_dtype_and_values(kind, cast, bank_dtype):
    m = dps_fast.DPSLoss(labels_a(), C, bank=kind, c=1e5, eps=1e-6, bank_dtype=bank_dtype)  # inf/0 in float16
    before = snapshot(m)
    m = CASTS[cast](m)
    assert_unchanged(m, before)
    z = torch.randn(4, C, dtype=torch.float16 if cast != "double" else torch.float64).float()
    assert torch.isfinite(m(z, torch.tensor([0, 5, 6, 11])))


def test_meta_move_keeps_the_dtype_of_a_local_bank():
    m = dps_fast.DPSLoss(labels_a(), C).to("meta", torch.float16)
    assert m.alpha.device.type == "meta" and m.alpha.dtype == torch.float32
    assert m.given_labels.device.type == "meta" and m.given_labels.dtype == torch.int64


def test_to_bank_dtype_checks_values_before_converting(kind):
    m = dps_fast.DPSLoss(labels_a(), C, bank=kind, c=1e5, eps=1e-2)
    before = snapshot(m)
    with pytest.raises(ValueError, match="finite and > 0 in the bank dtype torch.float16"):
        m.to_bank_dtype(torch.float16)
    assert_unchanged(m, before)
    with pytest.raises(TypeError, match="bank dtype"):
        m.to_bank_dtype(torch.int32)
    m.to_bank_dtype(torch.bfloat16)
    assert m.alpha.dtype == torch.bfloat16 and torch.equal(m.alpha, before[0].to(torch.bfloat16))
    assert torch.isfinite(m(torch.randn(3, C), torch.tensor([1, 2, 3])))


# --------------------------------------------------------------------------- construction
def _one_piece(labels, num_classes, c, eps, dtype):
    """init_prior as it was: full, then one scatter_ over the whole bank."""
    alpha = torch.full((labels.shape[0], num_classes), float(eps), dtype=dtype)
    alpha.scatter_(1, labels[:, None], float(c))
    return alpha


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n,num_classes", [(0, 3), (1, 1), (23, 1), (23, 7), (40, 13)])
def test_init_prior_in_blocks_is_bit_identical_to_one_piece(monkeypatch, dtype, n, num_classes):
    monkeypatch.setattr(prior, "_PRIOR_BLOCK_ELEMS", 20)  # blocks of 1 to 20 rows: many, and ragged
    labels = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(n))
    got = dps_fast.init_prior(labels, num_classes, c=7.3, eps=0.013, dtype=dtype)
    want = _one_piece(labels, num_classes, 7.3, 0.013, dtype)
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got.view(torch.uint8) if n else got, want.view(torch.uint8) if n else want)


def _status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


@pytest.mark.parametrize("case", ["local", "host", "prior"])
def test_bank_build_peaks_at_the_bank_plus_a_block(case):
    """A bfloat16 bank of 64 MB, built from labels (local and host bank) or from a float32
    prior: the build's peak memory stays under 1.25x the bank (in one piece it was 3x; the
    allocations are far above glibc's mmap threshold, so none hides in freed heap)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("cannot reset this process's peak RSS (Linux /proc/self/clear_refs)")
    n, c = 32768, 1024
    labels = torch.randint(0, c, (n,))
    kw = {"labels": labels, "num_classes": c}
    if case == "prior":
        kw = {"prior": dps_fast.init_prior(labels, c, dtype=torch.float32)}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current RSS
    base = _status_bytes("VmRSS")
    loss = dps_fast.DPSLoss(bank="host" if case == "host" else "local", bank_dtype=torch.bfloat16, **kw)
    size = loss.alpha.numel() * loss.alpha.element_size()
    assert (_status_bytes("VmHWM") - base) / size < 1.25


def test_one_rank_with_a_bad_state_dict_fails_the_load_on_every_rank(tmp_path):
    """Two ranks of a sharded bank (each loads its own shard's state dict): rank 1's holds a
    NaN. Both ranks raise the same problem (naming rank 1) and neither writes, so the shards
    stay one consistent bank. (Replicated banks share this code: DistributedBank.load_state.)"""
    from _bank_state_workers import worker_one_bad_rank

    spawn_ranks(worker_one_bad_rank, 2, 2, str(tmp_path), str(tmp_path), "sharded", 1)
    got = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    for g in got:
        assert "bank must be finite and > 0" in g["outcome"] and "(rank 1)" in g["outcome"], g["outcome"]
        assert g["unchanged"]

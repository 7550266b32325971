"""DPSLoss(top_k=k): the top-k bank on one process (docs/method.md §12) runs the step (the fused
CPU kernel, or the reference) on the batch's rows with every policy of the dense banks, and its read-outs see the
implied dense rows."""
import os

import pytest
import torch

import dps_fast
from dps_fast import topk as T
from _ranks import spawn_ranks

N, C, K = 40, 30, 4


def labels():
    return torch.arange(N) % C


def snapshot(crit):
    s = crit.store
    return s.ids.clone(), s.vals.clone(), s.rest.clone()


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_steps_equal_the_reference_step(views, reduction):
    """The bank moves the batch's rows to the step and back, bit for bit (on the reference
    backend; the fused CPU kernel against the reference: tests/test_topk_kernel.py)."""
    gen = torch.Generator().manual_seed(views)
    crit = dps_fast.DPSLoss(labels(), C, top_k=K, gamma=0.9, reduction=reduction, backend="reference")
    ref = T.topk_prior(labels(), C, K, eps=crit.eps)
    for _ in range(4):
        shape = (views, 8, C) if views > 1 else (8, C)
        z = (torch.randn(shape, generator=gen) * 3).requires_grad_()
        idx = torch.randperm(N, generator=gen)[:8]
        z_ref = z.detach().clone().requires_grad_()
        loss, want = crit(z, idx), T.reference_step(z_ref, idx, ref, gamma=0.9, reduction=reduction)
        g = torch.rand(loss.shape, generator=gen) + 0.5
        (loss * g).sum().backward()
        (want * g).sum().backward()
        assert torch.equal(loss, want) and torch.equal(z.grad, z_ref.grad)
    assert torch.equal(crit.store.ids.long(), ref.ids) and torch.equal(crit.store.vals, ref.vals)
    assert torch.equal(crit.store.rest, ref.rest)


@pytest.mark.parametrize("top_k, bank", [(K, "local"), (K, "host"), (None, "host"), (None, "local")])
def test_the_gradient_buffer_is_reused_only_when_nothing_holds_it(top_k, bank, monkeypatch):
    """The fused CPU step writes its gradient into the bank's GradCache buffer (ops/_common.py;
    every bank kind; the dense local bank above GradCache.FRESH_BYTES, here lowered to 0):
    after a backward through a layer the next step reuses that storage; while a graph, a
    .grad or another loss of the same step holds it, a step gets a new buffer, and every
    gradient equals that of a twin loss whose steps each finish before the next."""
    from dps_fast.ops._common import GradCache

    monkeypatch.setattr(GradCache, "FRESH_BYTES", 0)
    gen = torch.Generator().manual_seed(3)
    fused = dps_fast.DPSLoss(labels(), C, top_k=top_k, gamma=0.9, bank=bank)
    layer = torch.nn.Linear(5, C)
    pointers = []
    for _ in range(3):  # logits from a layer: the graph releases the buffer at backward
        fused(layer(torch.randn(8, 5, generator=gen)), torch.randperm(N, generator=gen)[:8]).backward()
        pointers.append(fused.store.grad_cache._buf.data_ptr())
    assert pointers[0] == pointers[1] == pointers[2]
    z = [(torch.randn(8, C, generator=gen) * 3).requires_grad_() for _ in range(3)]
    ids = [torch.randperm(N, generator=gen)[:8] for _ in range(3)]
    (fused(z[0], ids[0]) + fused(z[1], ids[1])).backward()  # two losses alive at once
    fused(z[2], ids[2]).backward()  # z[0].grad and z[1].grad still hold their buffers
    assert len({zi.grad.data_ptr() for zi in z}) == 3
    twin, gen = dps_fast.DPSLoss(labels(), C, top_k=top_k, gamma=0.9, bank=bank), torch.Generator().manual_seed(3)
    for _ in range(3):  # the same first three steps
        twin(layer(torch.randn(8, 5, generator=gen)), torch.randperm(N, generator=gen)[:8])
    for zi, ii in zip(z, ids):
        zt = zi.detach().clone().requires_grad_()
        twin(zt, ii).backward()
        assert torch.equal(zi.grad, zt.grad)


def test_the_host_kind_equals_the_local_bank():
    """HostDPSLoss(top_k=k): the rows stay on the host and travel to the step as (ids, values,
    rest, bound); losses, gradients, rows and state equal the local bank's bit for bit, with
    padding, prefetch, eval and bad input (checked before any write)."""
    gen = torch.Generator().manual_seed(7)
    local = dps_fast.DPSLoss(labels(), C, top_k=K, gamma=0.9)
    host = dps_fast.HostDPSLoss(labels(), C, top_k=K, gamma=0.9)
    assert host.bank_kind == "host" and host.store.vals.device.type == "cpu"
    for step in range(5):
        z = (torch.randn(8, C, generator=gen) * 3).requires_grad_()
        z2 = z.detach().clone().requires_grad_()
        idx = torch.randperm(N, generator=gen)[:8]
        valid = None if step % 2 else torch.rand(8, generator=gen) > 0.3
        host.prefetch(idx)
        a, b = local(z, idx, valid=valid), host(z2, idx, valid=valid)
        a.backward()
        b.backward()
        assert torch.equal(a, b) and torch.equal(z.grad, z2.grad)
    host.flush()
    assert same(snapshot(host), snapshot(local)) and host.tau_e == local.tau_e
    for key, value in local.state_dict().items():
        assert torch.equal(host.state_dict()[key], value), key
    before = snapshot(host)
    host.eval()
    host(torch.randn(4, C), torch.tensor([1, 2, 3, 4]))
    host.train()
    with pytest.raises(IndexError):
        host(torch.randn(2, C), torch.tensor([0, N]))
    with pytest.raises(IndexError):
        host.prefetch(torch.tensor([N]))
    assert same(snapshot(host), before)


def test_eval_padding_and_bad_input_never_write():
    crit = dps_fast.DPSLoss(labels(), C, top_k=K)
    before = snapshot(crit)
    z, idx = torch.randn(4, C), torch.tensor([1, 5, 9, 13])
    crit.eval()
    crit(z, idx)
    assert same(snapshot(crit), before)
    crit.train()
    crit(z, idx, valid=torch.tensor([True, False, True, False]))
    after = snapshot(crit)
    for pad in (5, 13):
        assert same([x[pad] for x in after], [x[pad] for x in before])
    assert not torch.equal(after[1][1], before[1][1])
    for bad, err in ((torch.tensor([1, 1, 2, 3]), ValueError), (torch.tensor([1, 2, 3, N]), IndexError)):
        with pytest.raises(err):
            crit(z, bad)
        assert same(snapshot(crit), after)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("ids", [[2, N, 7, -1, 11], [N, 0, 7, -1, 11]], ids=["inside-first", "outside-first"])
def test_validate_false_skips_an_id_outside_the_bank(backend, ids):
    """docs/method.md §9, as the dense bank: with validate=False an id outside [0, N) (N, -1) is
    skipped, its loss and gradient NaN; the other rows step as a call without it (row 0, which a
    skipped id reads, included), and padding still never writes."""
    gen = torch.Generator().manual_seed(3)
    z = (torch.randn(5, C, generator=gen) * 3).requires_grad_()
    idx, valid = torch.tensor(ids), torch.tensor([True, True, True, True, False])
    crit = dps_fast.DPSLoss(labels(), C, top_k=K, validate=False, reduction="none", backend=backend)
    want = dps_fast.DPSLoss(labels(), C, top_k=K, reduction="none", backend=backend)
    for mask in (None, valid):
        loss = crit(z, idx, valid=mask)
        loss.backward(torch.ones_like(loss))
        inside = (idx >= 0) & (idx < N)
        outside_pos = (~inside).nonzero()[:, 0]
        inside = inside.nonzero()[:, 0]
        z_in = z.detach()[inside].clone().requires_grad_()
        good = want(z_in, idx[inside], valid=None if mask is None else mask[inside])
        good.backward(torch.ones_like(good))
        assert torch.isnan(loss[outside_pos]).all() and torch.isnan(z.grad[outside_pos]).all()
        assert torch.equal(loss[inside], good) and torch.equal(z.grad[inside], z_in.grad)
        assert same(snapshot(crit), snapshot(want))
        z.grad = None


def test_read_outs_see_the_implied_dense_rows():
    torch.manual_seed(0)
    crit = dps_fast.DPSLoss(labels(), C, top_k=K, c=5.0, eps=0.05)
    for _ in range(5):
        crit(torch.randn(N, C) * 3, torch.randperm(N))
    dense = T.densify(crit.store.ids, crit.store.vals, crit.store.rest, C)
    idx = torch.tensor([3, 0, 17])
    torch.testing.assert_close(crit.targets(idx), dense[idx] / dense[idx].sum(1, keepdim=True))
    assert torch.equal(crit.alpha, dense) and torch.equal(crit.full_bank(), dense)
    got = crit.find_label_issues(rate=0.2)
    want = dps_fast.find_label_issues(dense, labels(), rate=0.2)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(crit.posterior()["label_error"], dps_fast.posterior_readouts(dense, labels())["label_error"])


def test_state_dict_round_trip_and_every_bad_load_writes_nothing():
    torch.manual_seed(1)
    src = dps_fast.DPSLoss(labels(), C, top_k=K)
    src(torch.randn(N, C), torch.randperm(N))
    dst = dps_fast.DPSLoss(labels(), C, top_k=K)
    dst.load_state_dict(src.state_dict())
    assert same(snapshot(dst), snapshot(src))
    fresh = dps_fast.DPSLoss(labels(), C, top_k=K)
    before = snapshot(fresh)

    def edit(key, fn):
        sd = {k: v.clone() for k, v in src.state_dict().items()}
        fn(sd[key])
        return sd

    bad = [edit("topk_ids", lambda t: t.__setitem__((2, 1), C)), edit("topk_ids", lambda t: t.__setitem__(
        (2, 1), int(t[2, 0]))), edit("topk_vals", lambda t: t.__setitem__((3, 0), float("nan"))),
        edit("topk_rest", lambda t: t.__setitem__(4, -1.0)), edit("given_labels", lambda t: t.__setitem__(0, C))]
    partial = src.state_dict()
    del partial["topk_rest"]
    for sd in bad + [partial]:
        with pytest.raises(RuntimeError):
            fresh.load_state_dict(sd, strict=False)
        assert same(snapshot(fresh), before)


def test_casts_keep_the_format_and_refusals_are_clear():
    crit = dps_fast.DPSLoss(labels(), C, top_k=K)
    crit.half()
    assert crit.store.vals.dtype == torch.float32 and crit.store.ids.dtype == torch.int16
    assert dps_fast.DPSLoss(torch.arange(4), 40000, top_k=3).store.ids.dtype == torch.int32
    with pytest.raises(ValueError, match="top_k: bank must be 'local', 'host', 'replicated', 'sharded' or 'auto', "
                                         "got 'ring'"):
        dps_fast.DPSLoss(labels(), C, top_k=K, bank="ring")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16, got torch.float64"):
        dps_fast.DPSLoss(labels(), C, top_k=K, bank_dtype=torch.float64)
    with pytest.raises(ValueError, match="not both finite and > 0 in torch.float16"):
        dps_fast.DPSLoss(labels(), C, top_k=K, bank_dtype=torch.float16, eps=1e-9)
    with pytest.raises(ValueError, match="top_k must be an int"):
        dps_fast.DPSLoss(labels(), C, top_k=C)
    with pytest.raises(ValueError, match="explicit prior"):
        dps_fast.DPSLoss(prior=torch.ones(N, C), top_k=K)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_values_step_in_float32_and_round_on_write(dtype):
    """bank_dtype=bfloat16 / float16: the values take 2 bytes; each step gathers them as float32
    (the fused CPU kernel runs), computes the target from the float32 update and rounds the
    written values (docs/method.md §12): the rows equal a float32 bank's stepped row by row
    with the values rounded after each step, and the host kind holds the same bits."""
    gen = torch.Generator().manual_seed(11)
    half = dps_fast.DPSLoss(labels(), C, top_k=K, bank_dtype=dtype)
    host = dps_fast.HostDPSLoss(labels(), C, top_k=K, bank_dtype=dtype)
    mirror = dps_fast.DPSLoss(labels(), C, top_k=K)  # float32, rounded by hand after each step
    mirror.store.vals.copy_(mirror.store.vals.to(dtype).float())
    assert half.store.vals.dtype == dtype and half.store.rest.dtype == torch.float32
    for _ in range(5):
        z, idx = torch.randn(8, C, generator=gen) * 3, torch.randperm(N, generator=gen)[:8]
        losses = [crit(z, idx) for crit in (half, host, mirror)]
        mirror.store.vals.copy_(mirror.store.vals.to(dtype).float())
        assert torch.equal(losses[0], losses[1]) and torch.equal(losses[0], losses[2])
    for a in (host, mirror):
        assert torch.equal(half.store.ids, a.store.ids) and torch.equal(half.store.vals.float(), a.store.vals.float())
        assert torch.equal(half.store.rest, a.store.rest)
    fresh = dps_fast.DPSLoss(labels(), C, top_k=K, bank_dtype=dtype)
    fresh.load_state_dict(half.state_dict())
    assert torch.equal(fresh.store.vals, half.store.vals)


def test_a_16_bit_save_loads_into_float32_and_a_float32_save_never_rounds(tmp_path):
    """save_bank records the values' dtype: a bfloat16 save loads into a float32 bank exactly; a
    float32 save into a bfloat16 bank is refused, the bank unchanged (as for dense banks)."""
    from _helpers import one_rank_gloo
    from dps_fast.distributed import DistributedDPSLoss, load_bank, save_bank

    make = lambda dt: DistributedDPSLoss(labels(), C, mode="sharded", top_k=K, bank_dtype=dt)  # noqa: E731
    gen = torch.Generator().manual_seed(12)
    with one_rank_gloo():
        saved = {}
        for dt in (torch.bfloat16, torch.float32):
            crit = make(dt)
            crit(torch.randn(8, C, generator=gen) * 3, torch.arange(8))
            save_bank(crit, str(tmp_path / str(dt)))
            saved[dt] = crit
        wide = make(torch.float32)
        load_bank(wide, str(tmp_path / str(torch.bfloat16)))
        assert torch.equal(wide.store.local.vals, saved[torch.bfloat16].store.local.vals.float())
        narrow = make(torch.bfloat16)
        before = narrow.store.local.vals.clone()
        with pytest.raises(ValueError, match="the save holds F32 top-k values, this bank keeps BF16"):
            load_bank(narrow, str(tmp_path / str(torch.float32)))
        assert torch.equal(narrow.store.local.vals, before)


def test_memory_is_k_values_a_row():
    crit = dps_fast.DPSLoss(torch.arange(1000) % 21841, 21841, top_k=32)
    s = crit.store
    per_row = (s.ids.element_size() + s.vals.element_size()) * 32 + s.rest.element_size() + s.bound.element_size()
    assert per_row == 200 and s.ids.numel() == 1000 * 32  # against 87,364 bytes a row dense float32


def test_the_bank_reports_a_bound_that_holds_against_a_dense_bank():
    """topk_error(): per row, bound / (2 mass) bounds the TV distance between the top-k and the
    dense bank's targets given the same evidence; it is 0 before any step and grows with the
    mass that k cannot keep."""
    torch.manual_seed(5)
    n, c = 64, 50
    lab = torch.randint(0, c, (n,))
    crit = dps_fast.DPSLoss(lab, c, top_k=3, c=5.0, eps=0.05)
    dense = dps_fast.DPSLoss(lab, c, c=5.0, eps=0.05, bank_dtype=torch.float64)
    assert crit.topk_error()["max_tv_bound"] == 0.0
    for _ in range(12):
        z, idx = torch.randn(n, c) * 2, torch.randperm(n)
        crit(z, idx)
        dense(z.double(), idx)
    tv = 0.5 * (crit.targets().double() - dense.targets().double()).abs().sum(1)
    bound = crit.store.bound.double() / (2 * (crit.store.vals.sum(1) + crit.store.rest).double())
    assert bool((tv <= bound + 1e-5).all())
    err = crit.topk_error()
    assert 0 < err["mean_tv_bound"] <= err["max_tv_bound"] and err["rows_with_error"] > 0
    state = crit.state_dict()
    assert "topk_bound" in state
    del state["topk_bound"]  # optional: an older state loads, the bound restarts at 0
    fresh = dps_fast.DPSLoss(lab, c, top_k=3, c=5.0, eps=0.05)
    fresh.load_state_dict(state)
    assert fresh.topk_error()["max_tv_bound"] == 0.0
    with pytest.raises(ValueError, match="dense bank"):
        dense.topk_error()


def test_soft_labels_and_tau_e_read_the_implied_rows(tmp_path):
    torch.manual_seed(2)
    crit = dps_fast.DPSLoss(labels(), C, top_k=K)
    crit(torch.randn(N, C) * 3, torch.randperm(N))
    path = str(tmp_path / "soft.safetensors")
    crit.export_soft_labels(path, top_k=K, dtype=torch.float32)  # the bank's own k: nothing lost but rounding
    got = dps_fast.load_soft_labels(path).targets(torch.arange(N))
    torch.testing.assert_close(got, crit.targets(), rtol=1e-5, atol=1e-6)
    dense = T.densify(crit.store.ids, crit.store.vals, crit.store.rest, C).double()
    t = dense / dense.sum(1, keepdim=True)
    want = float((1 - t.gather(1, labels()[:, None])).mean())
    assert crit.mean_label_error() == pytest.approx(want, rel=1e-6)


def test_two_replicas_stay_identical_and_equal_one_process():
    """DistributedDPSLoss(mode="replicated", top_k=k) on two ranks: both replicas equal the
    one-process bank that saw the global batches; the ranks' losses add up to its loss."""
    import os
    import tempfile


    from _topk_workers import C as C2, K as K2, N as N2, global_steps, worker_replicated

    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(worker_replicated, 2, 2, tmp, tmp)
        got = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    one = dps_fast.DPSLoss(torch.arange(N2) % C2, C2, top_k=K2, c=5.0, eps=0.05, gamma=0.9, reduction="sum")
    losses = [one(z, idx).detach() for z, idx in global_steps()]
    for r in range(2):
        for key, value in one.state_dict().items():
            if key != "tau_e_auto":  # each rank's state_dict holds its own part of the pass's sums
                assert torch.equal(got[r]["state"][key], value), (r, key)
        torch.testing.assert_close(got[r]["tau_e_state"], one.tau_e_state(), rtol=1e-6, atol=0)
    for step, want in enumerate(losses):
        torch.testing.assert_close(got[0]["losses"][step] + got[1]["losses"][step], want, rtol=1e-6, atol=1e-5)


def test_a_sharded_bank_equals_one_process():
    """DistributedDPSLoss(mode="sharded", top_k=k) on two ranks (padding in one step): each rank
    holds its rows of the one-process bank that saw the global batches; losses add up to its
    loss; read-outs (collectives), the error bound, tau_e's state and a state-dict round trip
    agree with it; eval writes nothing."""
    import os
    import tempfile


    from _topk_workers import C as C2, K as K2, N as N2, global_steps, worker_sharded

    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(worker_sharded, 2, 2, tmp, tmp)
        got = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    one = dps_fast.DPSLoss(torch.arange(N2) % C2, C2, top_k=K2, c=5.0, eps=0.05, gamma=0.9, reduction="sum")
    losses = []
    for step, (z, idx) in enumerate(global_steps()):
        valid = None if step != 2 else torch.cat([torch.arange(9)[r::2] % 4 != 0 for r in range(2)])
        order = torch.cat([torch.arange(9)[r::2] for r in range(2)])
        losses.append(one(z[order], idx[order], valid=valid).detach())
    for r in range(2):
        rows = slice(r, None, 2)
        assert torch.equal(got[r]["state"]["topk_ids"].long(), one.store.ids[rows].long())
        assert torch.equal(got[r]["state"]["topk_vals"], one.store.vals[rows])
        assert torch.equal(got[r]["state"]["topk_rest"], one.store.rest[rows])
        assert torch.equal(got[r]["full"], one.full_bank()) and got[r]["reloaded"]
        assert torch.equal(got[r]["targets"], one.targets(torch.arange(N2)[rows]))
        assert got[r]["error"] == pytest.approx(one.topk_error(), rel=1e-9)
        torch.testing.assert_close(got[r]["tau_e_state"], one.tau_e_state(), rtol=1e-6, atol=0)
        assert torch.equal(got[r]["ids"], torch.arange(N2)[rows])
        assert torch.equal(got[r]["alpha"], one.full_bank()[rows])  # crit.alpha: this rank's rows
        assert got[r]["label_error"] == pytest.approx(one.mean_label_error(), rel=1e-9)
    for step, want in enumerate(losses):
        torch.testing.assert_close(got[0]["losses"][step] + got[1]["losses"][step], want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_save_bank_and_load_bank_re_shard_and_verify(mode, tmp_path):
    """save_bank of a two-rank top-k bank loads back at two ranks and at one (re-sharded), equal
    to the one-process bank that saw the same batches; a dense save, a damaged value and a
    damaged byte are refused with the bank unchanged (docs/method.md §8.1)."""
    import glob
    import json


    from _helpers import one_rank_gloo
    from _topk_workers import C as C2, K as K2, N as N2, global_steps, worker_save
    from dps_fast.distributed import DistributedDPSLoss, load_bank, read_full_bank

    store = tmp_path / "store"
    store.mkdir()
    spawn_ranks(worker_save, 2, 2, str(store), str(tmp_path), mode)
    assert all(torch.load(tmp_path / f"{mode}{r}.pt", weights_only=True)["same"] for r in range(2))
    one = dps_fast.DPSLoss(torch.arange(N2) % C2, C2, top_k=K2, c=5.0, eps=0.05, gamma=0.9, tau_e=1.0)
    for z, idx in global_steps():
        order = torch.cat([torch.arange(9)[r::2] for r in range(2)])
        one(z[order], idx[order])
    folder = str(tmp_path / mode)
    doc = json.loads(open(os.path.join(folder, "bank-index.json")).read())
    assert (doc["layout"], doc["k"], doc["dtype"]) == ("topk", K2, "F32")  # 8k + 8 bytes a row, ids exact
    with one_rank_gloo():
        for into in ("replicated", "sharded"):
            crit = DistributedDPSLoss(torch.arange(N2) % C2, C2, mode=into, top_k=K2, c=5.0, eps=0.05)
            load_bank(crit, folder)
            assert torch.equal(crit.full_bank(), one.full_bank()), into
        assert torch.equal(read_full_bank(folder), one.full_bank().float())  # offline: the implied rows
        dense = DistributedDPSLoss(torch.arange(N2) % C2, C2, mode="sharded")
        with pytest.raises(ValueError, match="the save holds a top-k bank \(k = 3\), expected a dense bank"):
            load_bank(dense, folder)
        shard = sorted(glob.glob(os.path.join(folder, "bank-rank*.safetensors")))[0]
        raw = bytearray(open(shard, "rb").read())
        raw[-1] ^= 0x40
        open(shard, "wb").write(bytes(raw))
        crit = DistributedDPSLoss(torch.arange(N2) % C2, C2, mode="sharded", top_k=K2, c=5.0, eps=0.05)
        before = crit.full_bank()
        with pytest.raises(ValueError, match="checksum|bound finite"):
            load_bank(crit, folder)
        assert torch.equal(crit.full_bank(), before)



def test_above_2_to_the_24_classes_a_save_keeps_the_ids_in_float64(tmp_path):
    """float32 holds every class id up to 2**24; beyond, rows are packed and saved in float64, and
    a float32 save of so many classes is refused."""
    import json

    from _helpers import one_rank_gloo
    from dps_fast.distributed import DistributedDPSLoss, load_bank, save_bank

    c = 2 ** 24 + 7
    lab = torch.tensor([c - 1, c - 2, 3, 2 ** 24 + 1])
    with one_rank_gloo():
        crit = DistributedDPSLoss(lab, c, mode="sharded", top_k=2, c=5.0, eps=1e-6)
        crit.store.local.ids[1, 1] = c - 4  # 2**24 + 3: an id that float32 would round
        save_bank(crit, str(tmp_path / "big"))
        doc = json.loads((tmp_path / "big" / "bank-index.json").read_text())
        assert doc["dtype"] == "F64"
        fresh = DistributedDPSLoss(lab, c, mode="sharded", top_k=2, c=5.0, eps=1e-6)
        load_bank(fresh, str(tmp_path / "big"))
        assert torch.equal(fresh.store.local.ids, crit.store.local.ids)
        doc["dtype"] = "F32"
        (tmp_path / "big" / "bank-index.json").write_text(json.dumps(doc))
        with pytest.raises(ValueError, match="F32 rows cannot hold the class ids"):
            load_bank(fresh, str(tmp_path / "big"))


def test_a_save_of_float64_rows_still_loads(tmp_path, monkeypatch):
    """Top-k saves before the float32 packing hold F64 rows (and no values dtype): they load,
    equal, into today's banks."""
    import json

    from _helpers import one_rank_gloo
    from dps_fast.banks import topk_saves
    from dps_fast.distributed import DistributedDPSLoss, load_bank, save_bank

    with one_rank_gloo():
        crit = DistributedDPSLoss(labels(), C, mode="sharded", top_k=K)
        crit(torch.randn(8, C, generator=torch.Generator().manual_seed(13)) * 3, torch.arange(8))
        with monkeypatch.context() as m:
            m.setattr(topk_saves, "packed_dtype", lambda num_classes: torch.float64)
            save_bank(crit, str(tmp_path / "old"))
        doc = json.loads((tmp_path / "old" / "bank-index.json").read_text())
        doc.pop("values")  # as written before the values dtype was recorded
        (tmp_path / "old" / "bank-index.json").write_text(json.dumps(doc))
        assert doc["dtype"] == "F64"
        fresh = DistributedDPSLoss(labels(), C, mode="sharded", top_k=K)
        load_bank(fresh, str(tmp_path / "old"))
        for name in ("ids", "vals", "rest", "bound"):
            assert torch.equal(getattr(fresh.store.local, name), getattr(crit.store.local, name)), name


def test_a_saved_top_k_row_is_checked_by_its_layout():
    from dps_fast.banks.shard_files import Layout

    rule = Layout(2)  # ids, ids, val, val, rest, bound
    good = torch.tensor([[0.0, 4.0, 1.5, 0.1, 0.0, 0.0]], dtype=torch.float64)
    assert not rule.bad_values(good, 5).any()
    for col, value in [(0, 2.5), (1, -1.0), (0, 5.0), (2, 0.0), (3, float("inf")), (4, -1e-9), (5, float("nan")),
                       (1, 0.0), (3, 1e39)]:  # a class held twice; a value beyond float32
        bad = good.clone()
        bad[0, col] = value
        assert rule.bad_values(bad, 5).nonzero().tolist() == [[0, col]], (col, value)
    assert Layout().bad_values(good, 6).nonzero()[:, 1].tolist() == [0, 4, 5]  # dense: every value > 0

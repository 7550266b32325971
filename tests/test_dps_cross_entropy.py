"""Fused DPS step (every available backend) against the reference, by the tolerance rule."""
import itertools

import numpy as np
import pytest
import torch

import dps_fast
from dps_fast import _fast_path
from _helpers import FUSED, HAS_CPU, case_id, eager_spy, python_path_only, rule_check

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BANK_DTYPES = [torch.float32, torch.bfloat16]
CS = [1, 2, 10, 100, 1000, 1023, 32773]
BS = [1, 7, 256]


def shapes_for(backend, device):
    out = []
    for c, b, v in itertools.product(CS, BS, (1, 2)):
        if c * b * v > 2_000_000 and (b, v) != (256, 1):
            continue  # the largest case runs once (V=1), see dtype filter below
        if backend == "triton" and device == "cpu" and c * b * v > 300_000:
            continue  # Triton interpreter: keep under a second per case
        out.append((c, b, v))
    return out


def dps_run(backend, z, idx, alpha, red, g, **kw):
    a = alpha.clone()
    x = z.clone().requires_grad_(True)
    loss = dps_fast.dps_cross_entropy(x, idx, a, reduction=red, backend=backend, **kw)
    (loss * g).sum().backward()
    return loss.detach(), x.grad, a


CASES = [
    (case, shape, zdt, adt)
    for case in FUSED
    for shape in shapes_for(*case)
    for zdt in DTYPES
    for adt in BANK_DTYPES
    if shape[0] * shape[1] * shape[2] <= 2_000_000 or (zdt, adt) == (torch.float32, torch.float32)
]


@pytest.mark.parametrize(
    "case,shape,zdt,adt", CASES,
    ids=[f"{case_id(c)}-C{s[0]}-B{s[1]}-V{s[2]}-{str(z)[6:]}-bank_{str(a)[6:]}" for c, s, z, a in CASES],
)
def test_dps_matches_reference(case, shape, zdt, adt):
    backend, device = case
    c, b, v = shape
    gen = torch.Generator().manual_seed(c * 1000 + b * 10 + v)
    n = max(2 * b, 50)
    labels = torch.randint(0, c, (n,), generator=gen)
    alpha = dps_fast.init_prior(labels, c, c=5.0, eps=0.05, dtype=adt)
    # make the bank rows non-trivial: a few earlier steps' worth of evidence
    alpha += (torch.rand(n, c, generator=gen) * 0.5).to(adt)
    alpha = alpha.to(device)
    z = (torch.randn((v, b, c) if v > 1 else (b, c), generator=gen) * 3).to(zdt).to(device)
    idx = torch.randperm(n, generator=gen)[:b].to(device)
    untouched = torch.ones(n, dtype=torch.bool, device=device)
    untouched[idx] = False
    kw = dict(gamma=0.9, tau_e=1.0 if (c + b) % 3 else 2.0)
    for red, target in (("none", "posterior"), ("mean", "prior"), ("sum", "posterior")):
        g = (torch.rand(z.shape[:-1], generator=gen) + 0.5).to(device) if red == "none" else \
            torch.tensor(0.7, device=device)
        lk, gk, ak = dps_run(backend, z, idx, alpha, red, g, target=target, **kw)
        le, ge, ae = dps_run("reference", z, idx, alpha, red, g, target=target, **kw)
        lx, gx, ax = dps_run("reference", z.double(), idx, alpha.double(), red, g.double(), target=target, **kw)
        assert lk.dtype == torch.float32 and gk.dtype == zdt and ak.dtype == adt
        assert lk.shape == le.shape
        # a sum of V*B terms carries their rounding: scale the tolerance by the term count
        rule_check(lk, le, lx, torch.float32, f"loss ({red}, {target})",
                   scale=float(b * v) if red == "sum" else None)
        rule_check(gk, ge, gx, zdt, f"grad ({red}, {target})")
        rule_check(ak, ae, ax, adt, f"bank ({red}, {target})")
        assert torch.equal(ak[untouched], alpha[untouched]), "untouched bank rows changed"


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_no_grad_forward_and_update_flag(case):
    backend, device = case
    torch.manual_seed(0)
    alpha = dps_fast.init_prior(torch.randint(0, 10, (30,)), 10).to(device)
    z = torch.randn(2, 8, 10, device=device)
    idx = torch.randperm(30)[:8].to(device)
    a_ref, a_k = alpha.clone(), alpha.clone()
    with torch.no_grad():
        lk = dps_fast.dps_cross_entropy(z, idx, a_k, backend=backend)
    lr = dps_fast.dps_cross_entropy(z, idx, a_ref, backend="reference")
    torch.testing.assert_close(lk, lr)
    torch.testing.assert_close(a_k, a_ref)
    before = a_k.clone()
    l2 = dps_fast.dps_cross_entropy(z, idx, a_k, update=False, backend=backend)
    assert torch.equal(a_k, before)
    torch.testing.assert_close(l2, dps_fast.dps_cross_entropy(z, idx, a_ref.clone(), update=False,
                                                              backend="reference"))


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_noncontiguous_logits_and_inplace_grad(case):
    backend, device = case
    torch.manual_seed(1)
    alpha = dps_fast.init_prior(torch.randint(0, 33, (40,)), 33).to(device)
    base = torch.randn(33, 12, device=device)
    z = base.t()  # [12, 33], non-contiguous
    idx = torch.randperm(40)[:12].to(device)
    _, gk, ak = dps_run(backend, z, idx, alpha, "mean", torch.tensor(1.0, device=device))
    _, gr, ar = dps_run("reference", z, idx, alpha, "mean", torch.tensor(1.0, device=device))
    torch.testing.assert_close(gk, gr)
    torch.testing.assert_close(ak, ar)
    # in-place gradient: written into the logits' storage
    leaf = z.contiguous().clone().requires_grad_(True)
    x = leaf * 1.0
    a2 = alpha.clone()
    loss = dps_fast.dps_cross_entropy(x, idx, a2, backend=backend, inplace_grad=True)
    loss.backward()
    torch.testing.assert_close(leaf.grad, gr)
    torch.testing.assert_close(x.detach(), gr)  # the logits buffer now holds the gradient
    torch.testing.assert_close(a2, ar)


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_out_of_range_rows_skipped_without_validation(case):
    backend, device = case
    alpha = torch.ones(4, 3, device=device)
    before = alpha.clone()
    z = torch.zeros(2, 3, device=device)
    loss = dps_fast.dps_cross_entropy(z, torch.tensor([1, 9], device=device), alpha, reduction="none",
                                      backend=backend, validate=False)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0])
    assert torch.equal(alpha[[0, 2, 3]], before[[0, 2, 3]])
    assert not torch.equal(alpha[1], before[1])


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_repeated_backward_with_retained_graph(case):
    """The forward's gradient buffer is handed to autograd without a copy when the
    upstream gradient is 1; a retained graph must still give the same gradient each time."""
    backend, device = case
    alpha = dps_fast.init_prior(torch.arange(6) % 3, 3).to(device)
    z = torch.randn(4, 3, device=device, requires_grad=True)
    loss = dps_fast.dps_cross_entropy(z, torch.arange(4, device=device), alpha, backend=backend)
    loss.backward(retain_graph=True)
    g1 = z.grad.clone()
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(z.grad, 3 * g1)


@pytest.mark.parametrize("case", FUSED, ids=case_id)
@pytest.mark.parametrize("v", [9, 17])
def test_any_number_of_views(case, v):
    """No backend limits V (docs/method.md §9): CUDA keeps more than 8 views' statistics in
    global scratch and stores the bank row once, after its last chunk of views."""
    backend, device = case
    gen = torch.Generator().manual_seed(v)
    n, b, c = 40, 13, 37
    alpha = dps_fast.init_prior(torch.randint(0, c, (n,), generator=gen), c, c=5.0, eps=0.05).to(device)
    z = (torch.randn(v, b, c, generator=gen) * 3).to(device)
    idx = torch.randperm(n, generator=gen)[:b].to(device)
    for red in ("none", "mean"):
        g = (torch.rand(v, b, generator=gen) + 0.5).to(device) if red == "none" else torch.tensor(0.7, device=device)
        lk, gk, ak = dps_run(backend, z, idx, alpha, red, g, tau_e=2.0)
        le, ge, ae = dps_run("reference", z, idx, alpha, red, g, tau_e=2.0)
        lx, gx, ax = dps_run("reference", z.double(), idx, alpha.double(), red, g.double(), tau_e=2.0)
        rule_check(lk, le, lx, torch.float32, f"loss ({red})")
        rule_check(gk, ge, gx, torch.float32, f"grad ({red})")
        rule_check(ak, ae, ax, torch.float32, f"bank ({red})")


# ---------------------------------------------------------------- the eager fast path
# dps_cross_entropy runs plain CPU calls as one C++ op (csrc/fast_path.cpp), which either
# takes a call on or declines it (NotImplementedError, before touching anything) to the
# Python path. Same kernel, same autograd node: the results must be bit-identical.


# The op has two entries: torch.ops, and the CPython binding of dps_fast._C (csrc/module.cpp,
# prebuilt or built on first import), which dps_fast prefers. make sanitize loads a stub instead.
BINDING = _fast_path._eager_bindings.get("dps_ce_eager")
ENTRIES = ["torch.ops", pytest.param("binding", marks=pytest.mark.skipif(
    BINDING is None, reason="dps_fast._C has no binding here (make sanitize's stub)"))]


def eager_entry(entry):
    return BINDING if entry == "binding" else torch.ops.dps_fast.dps_ce_eager.default


def eager_call(logits, index, alpha, gamma=0.95, tau_e=1.0, target="posterior", reduction="mean", update=True,
               validate=True, backend=None, entry="torch.ops"):
    return eager_entry(entry)(logits, index, alpha, gamma, tau_e, target, reduction, update, validate, backend)


FAST_CASES = [  # (V, B, C, logits dtype, bank dtype, keyword arguments)
    (1, 128, 10, torch.float32, torch.float32, {}),
    (1, 7, 1, torch.float32, torch.float32, dict(reduction="sum")),
    (3, 13, 37, torch.float32, torch.float32, dict(reduction="none", tau_e=2.0)),
    (1, 33, 100, torch.bfloat16, torch.float32, dict(target="prior")),
    (2, 9, 19, torch.float32, torch.bfloat16, dict(update=False, gamma=1)),
    (1, 20, 8, torch.float16, torch.float16, dict(validate=False, tau_e=3)),
]


@pytest.mark.skipif(not HAS_CPU, reason="the C++ ops are not built")
@pytest.mark.parametrize("case", FAST_CASES, ids=lambda c: f"V{c[0]}-B{c[1]}-C{c[2]}-{c[3]}-{c[4]}-{c[5]}")
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_eager_fast_path_is_bit_identical_to_the_python_path(monkeypatch, case, strided):
    v, b, c, zdt, adt, kw = case
    gen = torch.Generator().manual_seed(b * c)
    n = 3 * b
    shape = (v, b, c) if v > 1 else (b, c)
    # strided: every other logit of a wider tensor, a column slice of a wider bank (rows of stride 2C)
    z_wide = (torch.randn(*shape[:-1], 2 * c if strided else c, generator=gen) * 3).to(zdt)
    idx = torch.randperm(n, generator=gen)[:b].to(torch.int32 if strided else torch.int64)
    a_wide = dps_fast.init_prior(torch.randint(0, c, (n,), generator=gen), c, c=5.0).repeat(1, 2).to(adt)
    if not strided:
        a_wide = a_wide[:, :c].contiguous()
    g = torch.rand(shape[:-1], generator=gen) + 0.5 if kw.get("reduction") == "none" else torch.tensor(0.7)

    def run():
        leaf = z_wide.clone().requires_grad_(True)
        bank = a_wide.clone()
        x, alpha = (leaf[..., ::2], bank[:, :c]) if strided else (leaf, bank)
        assert x.is_contiguous() != strided and alpha.is_contiguous() != strided
        loss = dps_fast.dps_cross_entropy(x, idx, alpha, **kw)
        loss.backward(g)
        return loss.detach(), leaf.grad, bank

    taken = eager_spy(monkeypatch)
    fast = run()
    assert len(taken) == 1, "the eager op did not take the call on"
    python_path_only(monkeypatch)
    slow = run()
    for what, got, want in zip(("loss", "grad", "bank"), fast, slow):
        assert got.dtype == want.dtype and got.shape == want.shape, what
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), what


@pytest.mark.skipif(not HAS_CPU, reason="the C++ ops are not built")
def test_eager_fast_path_without_autograd(monkeypatch):
    """No gradient wanted (no_grad, or logits without requires_grad): no graph, same loss."""
    z = torch.randn(6, 4, requires_grad=True)
    idx = torch.tensor([5, 0, 3, 1, 2, 4])
    alpha = dps_fast.init_prior(torch.arange(6) % 4, 4)
    with torch.no_grad():
        loss = dps_fast.dps_cross_entropy(z, idx, alpha.clone())
    assert loss.grad_fn is None and not loss.requires_grad
    python_path_only(monkeypatch)
    with torch.no_grad():
        assert torch.equal(loss, dps_fast.dps_cross_entropy(z, idx, alpha.clone()))


def _declined_or_raised(call, bank):
    before = bank.clone()
    with pytest.raises((NotImplementedError, IndexError, ValueError)) as info:
        call()
    assert torch.equal(bank, before), "the bank changed before the error"
    return info.type


@pytest.mark.skipif(not HAS_CPU, reason="the C++ ops are not built")
@pytest.mark.parametrize("entry", ENTRIES)
def test_eager_op_declines_what_the_python_path_refuses_or_handles(entry):
    """Everything test_validation.py's BAD_DPS refuses, and what the Python path handles
    itself (float64, empty batch, odd banks, another backend), the op declines untouched.
    Index errors raise with the Python path's messages (csrc/cpu/validate.cpp)."""
    from test_validation import BAD_DPS

    alpha = dps_fast.init_prior(torch.randint(0, 5, (20,)), 5)
    z, idx = torch.randn(4, 5), torch.tensor([0, 3, 7, 19])
    for what, changes, exc, _ in BAD_DPS:
        kw = {**dict(logits=z, index=idx, alpha=alpha), **changes}
        if not all(isinstance(kw[k], torch.Tensor) for k in ("logits", "index", "alpha")):
            continue  # the Python guard (plain_arguments) keeps these off the op
        bank = kw["alpha"]
        got = _declined_or_raised(lambda: eager_call(**kw, entry=entry), bank)
        assert got is NotImplementedError or got is exc, what
    handled = {
        "float64 logits": dict(logits=z.double()),
        "float64 bank": dict(alpha=alpha.double()),
        "empty batch": dict(logits=z[:0], index=idx[:0]),
        "no views": dict(logits=z[None][:0]),
        "bool index": dict(index=torch.ones(4, dtype=torch.bool)),
        "expanded bank": dict(alpha=torch.ones(1, 5).expand(20, 5)),
        "overlapping rows": dict(alpha=torch.ones(30).as_strided((20, 5), (1, 1))),
        "bank sharing the logits": dict(alpha=z),
        "named backend": dict(backend="reference"),
        "nan gamma": dict(gamma=float("nan")),
        "tiny tau_e": dict(tau_e=1e-39),
        "sparse logits": dict(logits=z.to_sparse()),
        "bank that requires grad": dict(alpha=alpha.clone().requires_grad_(True)),
        "negated view": dict(logits=torch._neg_view(-z)),
    }
    for what, changes in handled.items():
        kw = {**dict(logits=z, index=idx, alpha=alpha), **changes}
        assert _declined_or_raised(lambda: eager_call(**kw, entry=entry), kw["alpha"]) is NotImplementedError, what


@pytest.mark.skipif(not HAS_CPU, reason="the C++ ops are not built")
@pytest.mark.parametrize("entry", ENTRIES)
def test_eager_op_follows_the_backend_environment_variable(monkeypatch, entry):
    alpha = dps_fast.init_prior(torch.randint(0, 5, (20,)), 5)
    z, idx = torch.randn(4, 5), torch.tensor([0, 3, 7, 19])
    monkeypatch.setenv("DPS_FAST_BACKEND", "reference")
    assert _declined_or_raised(lambda: eager_call(z, idx, alpha, entry=entry), alpha) is NotImplementedError
    eager_call(z, idx, alpha, backend="cpu", entry=entry)  # a named backend overrides the environment
    monkeypatch.setenv("DPS_FAST_BACKEND", "cpu")
    eager_call(z, idx, alpha, entry=entry)


@pytest.mark.skipif(BINDING is None, reason="dps_fast._C has no binding here")
def test_the_binding_is_the_op_called_without_torch_ops():
    """dps_fast calls the binding where dps_fast._C has it; it runs the same op
    through the dispatcher (the profiler names it), bit for bit, and raises the same errors."""
    assert _fast_path.eager_op("dps_ce_eager", torch.randn(2, 3), None) is BINDING
    gen = torch.Generator().manual_seed(3)
    z, idx = torch.randn(2, 9, 17, generator=gen), torch.randperm(40, generator=gen)[:9]
    bank = dps_fast.init_prior(torch.randint(0, 17, (40,), generator=gen), 17)
    outs = {}
    for entry in ("torch.ops", "binding"):
        leaf, alpha = z.clone().requires_grad_(True), bank.clone()
        with torch.profiler.profile() as prof:
            loss = eager_call(leaf, idx, alpha, 0.9, 2, "prior", "none", True, True, "cpu", entry=entry)
        assert "dps_fast::dps_ce_eager" in {e.name for e in prof.events()}, entry
        loss.backward(torch.rand(2, 9, generator=torch.Generator().manual_seed(5)))
        outs[entry] = (loss.detach(), leaf.grad, alpha)
    for got, want in zip(outs["binding"], outs["torch.ops"]):
        assert torch.equal(got, want)
    for entry in ("torch.ops", "binding"):
        with pytest.raises(IndexError, match="index 40 is out of range for a bank of 40 rows"):
            eager_call(z[0, :2], torch.tensor([1, 40]), bank, entry=entry)


@pytest.mark.skipif(BINDING is None, reason="dps_fast._C has no binding here")
def test_the_binding_declines_what_torch_ops_would_treat_otherwise():
    """Arguments the binding cannot take as torch.ops would (a tensor subclass, whose
    __torch_function__ torch.ops honours; numbers, flags and names of other types) are
    declined untouched, so the Python path runs them; a wrong count is a TypeError."""
    class Traced(torch.Tensor):
        pass

    alpha = dps_fast.init_prior(torch.randint(0, 5, (20,)), 5)
    z, idx = torch.randn(4, 5), torch.tensor([0, 3, 7, 19])
    odd = {"subclass logits": dict(logits=z.as_subclass(Traced)), "subclass index": dict(index=idx.as_subclass(Traced)),
           "subclass bank": dict(alpha=alpha.clone().as_subclass(Traced)), "list index": dict(index=[0, 3, 7, 19]),
           "bool gamma": dict(gamma=True), "numpy gamma": dict(gamma=np.float64(0.9)),
           "int beyond 2**53": dict(tau_e=2 ** 60), "int flag": dict(update=1), "bytes target": dict(target=b"prior"),
           "bytes backend": dict(backend=b"cpu")}
    for what, changes in odd.items():
        kw = {**dict(logits=z, index=idx, alpha=alpha), **changes}
        before = kw["alpha"].clone()
        with pytest.raises(NotImplementedError, match=_fast_path.EAGER_DECLINES):
            eager_call(**kw, entry="binding")
        assert torch.equal(kw["alpha"], before), what
    with pytest.raises(TypeError, match="takes 10 positional arguments"):
        BINDING(z, idx, alpha)
    # a subclass's __torch_function__ still sees the public call, through the Python path
    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return super().__torch_function__(func, types, args, kwargs or {})

    loss = dps_fast.dps_cross_entropy(z.as_subclass(Logged), idx, alpha.clone())
    assert type(loss) is Logged and any("dps_ce_fwd" in f for f in seen), "__torch_function__ was bypassed"


@pytest.mark.skipif(not HAS_CPU, reason="the C++ ops are not built")
def test_eager_op_declines_under_a_dispatch_mode(monkeypatch):
    """A mode must see the Python path's ops (selective checkpointing replays them)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    alpha = dps_fast.init_prior(torch.randint(0, 5, (20,)), 5)
    z, idx = torch.randn(4, 5, requires_grad=True), torch.tensor([0, 3, 7, 19])
    lists = []
    for path in ("eager", "python"):
        if path == "python":
            python_path_only(monkeypatch)
        seen = []
        with Seen():
            dps_fast.dps_cross_entropy(z, idx, alpha)
        lists.append(seen)
    assert lists[0] == lists[1] and any("dps_ce_fwd" in op for op in lists[0])


@pytest.mark.skipif(not HAS_CPU, reason="the C++ ops are not built")
def test_eager_fast_path_autograd_node(monkeypatch):
    """The fast path's own autograd node (csrc/ops.cpp, AttachGradBackward): a kept graph, an
    upstream gradient, the graph freed after backward, a handed-out buffer changed in place,
    no second derivative."""
    z, idx = torch.randn(6, 5), torch.tensor([5, 0, 3, 1, 2, 4])
    alpha = dps_fast.init_prior(torch.arange(6) % 5, 5)
    taken = eager_spy(monkeypatch)
    x = z.clone().requires_grad_(True)
    loss = dps_fast.dps_cross_entropy(x, idx, alpha.clone())
    assert len(taken) == 1 and loss.grad_fn.name() == "dps_fast::AttachGradBackward"
    loss.backward(torch.tensor(3.0), retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, first * (4 / 3))
    with pytest.raises(RuntimeError, match="a second time"):
        loss.backward()
    # with the graph kept, autograd.grad hands out the buffer itself: changed in place, it
    # must not feed the next backward
    loss = dps_fast.dps_cross_entropy(x, idx, alpha.clone())
    (handed,) = torch.autograd.grad(loss, x, retain_graph=True)
    handed.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, x)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(dps_fast.dps_cross_entropy(x, idx, alpha.clone()), x, create_graph=True)
    python_path_only(monkeypatch)
    y = z.clone().requires_grad_(True)
    dps_fast.dps_cross_entropy(y, idx, alpha.clone()).backward(torch.tensor(3.0))
    assert torch.equal(first, y.grad)


@pytest.mark.skipif(not HAS_CPU, reason="the C++ ops are not built")
def test_eager_fast_path_and_compiled_autograd(monkeypatch):
    """Compiled autograd cannot trace the fast path's node: a loss computed while it is on
    takes the Python path (and backward matches); one computed before it is turned on
    fails in backward with a message that says so."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    z, idx = torch.randn(6, 5), torch.tensor([5, 0, 3, 1, 2, 4])
    alpha = dps_fast.init_prior(torch.arange(6) % 5, 5)
    taken = eager_spy(monkeypatch)
    x = z.clone().requires_grad_(True)
    dps_fast.dps_cross_entropy(x, idx, alpha.clone()).backward()
    with compiled_autograd._enable(lambda graph: graph):
        y = z.clone().requires_grad_(True)
        dps_fast.dps_cross_entropy(y, idx, alpha.clone()).backward()
    assert len(taken) == 1, "the fast path took a call under compiled autograd"
    torch.testing.assert_close(y.grad, x.grad)
    loss = dps_fast.dps_cross_entropy(z.clone().requires_grad_(True), idx, alpha.clone())
    with pytest.raises(NotImplementedError, match="compiled autograd cannot trace"):
        with compiled_autograd._enable(lambda graph: graph):
            loss.backward()


@pytest.mark.skipif(not HAS_CPU, reason="the C++ ops are not built")
@pytest.mark.parametrize("selective", [False, True], ids=["checkpoint", "selective-checkpoint"])
def test_checkpointed_step_updates_once_and_matches(selective):
    """Activation checkpointing that recomputes the step in backward (early_stop=False; a
    selective policy replays the forward's ops): the bank is updated once, and the gradient
    is that of the uncheckpointed step."""
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, generator=gen)
    lin = torch.nn.Linear(8, 5)
    idx = torch.tensor([4, 0, 9, 2, 7, 5])
    w = torch.rand(6, generator=gen) + 0.5
    prior = dps_fast.init_prior(torch.arange(12) % 5, 5)

    def f(inp, alpha):
        return (dps_fast.dps_cross_entropy(lin(inp), idx, alpha, reduction="none") * w).sum()

    def grads(use_checkpoint):
        lin.zero_grad()
        alpha = prior.clone()
        if not use_checkpoint:
            f(x, alpha).backward()
        else:
            kw = dict(early_stop=False)
            if selective:
                kw = dict(context_fn=functools.partial(create_selective_checkpoint_contexts,
                                                       [torch.ops.aten.mm.default]))
            # the bank is state, not an input: checkpoint refuses inputs changed in place (docs/method.md §9)
            checkpoint(functools.partial(f, alpha=alpha), x, use_reentrant=False, **kw).backward()
        return lin.weight.grad.clone(), alpha

    g_plain, a_plain = grads(False)
    g_ckpt, a_ckpt = grads(True)
    assert torch.equal(a_ckpt, a_plain)
    torch.testing.assert_close(g_ckpt, g_plain, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_CPU, reason="the C++ ops are not built")
def test_arguments_the_schema_would_misread_take_the_python_path():
    alpha = dps_fast.init_prior(torch.randint(0, 5, (20,)), 5)
    idx = torch.tensor([0, 3, 7, 19])
    with pytest.raises(TypeError, match="floating-point"):  # the logits are checked first
        dps_fast.dps_cross_entropy(torch.ones(4, 5, dtype=torch.long), idx, alpha, gamma=10 ** 400)
    with pytest.raises(ValueError, match="reduction must be one of"):
        dps_fast.dps_cross_entropy(torch.randn(4, 5), idx, alpha, reduction="\ud800")


@pytest.mark.parametrize("case", FUSED, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_16_bit_bank_is_the_float32_update_rounded_to_nearest_even(case, dtype):
    """Every backend stores a 16-bit bank row as the float32 update rounded to nearest even,
    bit for bit as Tensor.to: the same step on a float32 copy of the bank, then rounded. (The
    Triton interpreter rounds to bfloat16 toward zero by itself; dps_fast/kernels/_rounding.py.)
    C = 37: one CPU path for both bank dtypes (C <= 16 with a float32 bank takes another)."""
    backend, device = case
    gen = torch.Generator().manual_seed(3)
    alpha = (dps_fast.init_prior(torch.randint(0, 37, (90,), generator=gen), 37, c=5.0, eps=0.05)
             + torch.rand(90, 37, generator=gen)).to(dtype)
    z = torch.randn(50, 37, generator=gen) * 3
    idx = torch.randperm(90, generator=gen)[:50]
    a16, a32 = alpha.clone().to(device), alpha.float().to(device)
    for bank in (a16, a32):
        dps_fast.dps_cross_entropy(z.to(device), idx.to(device), bank, gamma=0.9, backend=backend)
    assert torch.equal(a16.cpu().view(torch.int16), a32.cpu().to(dtype).view(torch.int16))

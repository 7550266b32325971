"""Property-based tests: every public op on every available backend against the reference
(the oracle), by the tolerance rule (tests/_helpers.py::rule_check), over random shapes,
dtypes, strides, index dtypes, options, non-finite and huge logits (docs/method.md §2-§4,
§8, §9). Invalid input: the same exception type in every backend, before any write.

`make test` runs the derandomized default profile (a few examples per test and backend);
`make fuzz` runs the "fuzz" profile (DPS_FAST_HYPOTHESIS_PROFILE=fuzz). A failure prints
its spec (a dict of plain values): paste it into the test's ``*_example`` function to
replay it.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import strategies as st

import dps_fast
from _fuzz import (BANK_LAYOUTS, DTYPES, FUZZ, INDEX_DTYPES, LAYOUTS, apply_specials, assert_only_changed, bank_container,
                   bank_view, classes, dtype_names, finite_rows, index_dtype_for, may_change, run_property, seeds,
                   specials, upstream, with_layout)
from _helpers import FUSED, case_id, rule_check

pytestmark = pytest.mark.skipif(not FUSED, reason="no fused backend on this machine")

# examples per test and backend in the default profile (make test); the fuzz profile scales them
BUDGET = {"dps": {"cpu": 40, "triton": 12}, "soft": {"cpu": 30, "triton": 10},
          "supcon": {"cpu": 25, "triton": 8}, "module": {"cpu": 12, "triton": 5}}
# elements per logits tensor: small in the default profile (the float64 reference dominates)
MAX_ELEMS = 120_000 if FUZZ else 12_000
gammas = st.one_of(st.just(1.0), st.floats(0.01, 1.0))
taus = st.one_of(st.just(1.0), st.floats(0.05, 20.0))
reductions = st.sampled_from(["none", "mean", "sum"])
scales = st.sampled_from([1e-3, 1.0, 3.0, 30.0, 1000.0])
g_scalars = st.sampled_from([0.7, -1.3, 2.5])


def loss_check(got, eager, exact, mag, red, what):
    """rule_check for a loss whose terms are of magnitude ``mag`` (per term, [..]): the
    rounding of logsumexp - <t, z> scales with |z|, not with the (cancelled) result. Terms
    where the reference at this dtype is not finite but the float64 one is (the oracle
    overflows: |z| near the float32 maximum) are not compared."""
    exact = exact.double()
    skip = ~torch.isfinite(eager.double()) & torch.isfinite(exact)
    if red == "none":
        keep = ~skip
        got, eager, exact, mag = got[keep], eager[keep], exact[keep], mag[keep]
    elif bool(skip.any()):
        return
    scale = float(mag.sum()) if red == "sum" else float(mag.max()) if mag.numel() else 1.0
    rule_check(got, eager, exact, torch.float32, what, scale=scale)


def term_magnitude(z3, exact_terms, tsum=None):
    """Per loss term: a bound of |logsumexp| + |<t, z>| (what the float32 rounding scales
    with), |loss| + 2 * sum(t) * max finite |z| of the row."""
    zf = z3.double().abs().nan_to_num(0.0, 0.0, 0.0)
    zmax = zf.amax(-1) if zf.shape[-1] else zf.sum(-1)
    w = 1.0 if tsum is None else tsum.double().abs()
    return exact_terms.double().abs().nan_to_num(0.0, 0.0, 0.0).reshape(zmax.shape) + 2 * w * zmax


FLT_MAX = torch.finfo(torch.float32).max


# =============================================================================== dps_cross_entropy
@st.composite
def dps_specs(draw, max_elems=MAX_ELEMS):
    v, c = draw(st.sampled_from([0, 1, 2, 3])), draw(classes())
    b = min(draw(st.integers(0, 64)), max(1, max_elems // (c * max(v, 1))))
    validate = draw(st.booleans())
    s = dict(v=v, b=b, c=c, n=b + draw(st.integers(0, 20)), validate=validate,
             outside=[] if validate else draw(st.lists(st.tuples(st.integers(0, 63), st.integers(-3, 3)),
                                                       max_size=3)),
             index=draw(st.sampled_from(sorted(INDEX_DTYPES))), zdt=draw(dtype_names), adt=draw(dtype_names),
             layout=draw(st.sampled_from(LAYOUTS)), bank_layout=draw(st.sampled_from(BANK_LAYOUTS)),
             gamma=draw(gammas), tau_e=draw(taus), target=draw(st.sampled_from(["posterior", "prior"])),
             reduction=draw(reductions), update=draw(st.booleans()), grad=draw(st.booleans()),
             inplace=draw(st.booleans()), scale=draw(scales), specials=draw(specials),
             prior=draw(st.sampled_from([(100.0, 0.01), (5.0, 0.5), (1.0, 1.0)])),
             noise=draw(st.sampled_from([0.0, 0.5, 5.0])), g=draw(g_scalars), seed=draw(seeds))
    return s


def dps_inputs(s):
    """(z3 [V, B, C] in the logits dtype, int64 ids, the bank [N, C] float32, upstream g)."""
    gen = torch.Generator().manual_seed(s["seed"])
    v, b, c, n = max(s["v"], 1), s["b"], s["c"], s["n"]
    z3 = (torch.randn(v, b, c, generator=gen) * s["scale"]).to(DTYPES[s["zdt"]])
    apply_specials(z3, s["specials"])
    ids = torch.randperm(max(n, 1), generator=gen)[:b]
    for pos, k in s["outside"]:  # validate=False: ids outside [0, N) are skipped, their loss is NaN
        if b:
            ids[pos % b] = k if k < 0 else n + k
    cp, ep = s["prior"]
    alpha = dps_fast.init_prior(torch.randint(0, c, (n,), generator=gen), c, c=cp, eps=ep)
    alpha += torch.rand(n, c, generator=gen) * s["noise"]
    g = upstream(z3.shape[:-1] if s["v"] else z3.shape[1:-1], s["reduction"], gen, s["g"]).float()
    return z3, ids, alpha, g


def dps_call(backend, s, z, idx, big0, g, exact=False):
    """One call of the public op; returns (loss, d loss / d logits or None, the bank container)."""
    n, c = s["n"], s["c"]
    big = big0.double() if exact else big0.clone()
    alpha = big if exact else bank_view(big, s["bank_layout"], n, c)
    if exact:
        z = z.double()
    inplace = s["inplace"] and s["grad"] and not exact and backend != "reference"
    leaf = z.clone().requires_grad_(s["grad"]) if inplace or exact else with_layout(z, s["layout"]).requires_grad_(s["grad"])
    x = leaf * 1 if inplace else leaf
    loss = dps_fast.dps_cross_entropy(x, idx, alpha, gamma=s["gamma"], tau_e=s["tau_e"], target=s["target"],
                                      reduction=s["reduction"], update=s["update"], backend=backend,
                                      validate=s["validate"], inplace_grad=inplace)
    if s["grad"]:
        (loss * g.to(loss.dtype)).sum().backward()
    return loss.detach(), leaf.grad, big


def dps_example(backend, s):
    z3, ids, alpha, g = dps_inputs(s)
    z = z3 if s["v"] else z3[0]
    lo, hi = (int(ids.min()), int(ids.max())) if ids.numel() else (0, 0)
    idx = ids.to(INDEX_DTYPES[s["index"]][0] if index_dtype_for(s["index"], lo, hi) else torch.int64)
    adt = DTYPES[s["adt"]]
    big0 = bank_container(alpha.to(adt), s["bank_layout"])
    lk, gk, bk = dps_call(backend, s, z, idx, big0, g)
    le, ge, be = dps_call("reference", s, z, idx, big0, g)
    lx, gx, ax = dps_call("reference", s, z, idx, bank_view(big0, s["bank_layout"], s["n"], s["c"]), g, exact=True)
    # the bank: only the in-range, finite samples' rows may change (docs/method.md §9)
    inside = (ids >= 0) & (ids < s["n"])
    rows = torch.zeros(s["n"], dtype=torch.bool)
    if s["update"]:
        rows[ids[inside & finite_rows(z3)]] = True
    allowed = may_change(big0, s["bank_layout"], s["n"], s["c"], rows)
    assert_only_changed(bk, big0, allowed, f"{backend} bank")
    assert_only_changed(be, big0, allowed, "reference bank")
    ak = bank_view(bk, s["bank_layout"], s["n"], s["c"])
    assert bool((torch.isfinite(ak) & (ak > 0)).all()), "the kernel wrote a non-finite or non-positive bank value"
    rule_check(ak, bank_view(be, s["bank_layout"], s["n"], s["c"]), ax, adt, "bank")
    assert lk.dtype == torch.float32 and lk.shape == le.shape
    terms = dps_fast.dps_cross_entropy(z3.double(), ids, alpha.double(), s["gamma"], s["tau_e"], s["target"],
                                       "none", update=False, backend="reference", validate=False)
    mag = term_magnitude(z3, terms)
    loss_check(lk, le, lx, mag.reshape(lx.shape) if s["reduction"] == "none" else mag, s["reduction"], "loss")
    if s["grad"]:
        assert gk.dtype == z.dtype and gk.shape == z.shape
        rule_check(gk, ge, gx, z.dtype, "grad")


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_dps_cross_entropy_matches_reference(case):
    backend = case[0]
    run_property(dps_specs(), lambda s: dps_example(backend, s), BUDGET["dps"][backend])


# =============================================================================== soft_cross_entropy
TARGET_KINDS = ("prob", "raw", "onehot", "zero-rows", "sparse")


@st.composite
def soft_specs(draw):
    c = draw(classes())
    b = min(draw(st.integers(0, 64)), max(1, MAX_ELEMS // c))
    return dict(b=b, c=c, zdt=draw(dtype_names), tdt=draw(dtype_names), layout=draw(st.sampled_from(LAYOUTS[:4])),
                t_layout=draw(st.sampled_from(LAYOUTS[:4])), target=draw(st.sampled_from(TARGET_KINDS)),
                reduction=draw(reductions), normalize=draw(st.booleans()), grad=draw(st.booleans()),
                inplace=draw(st.booleans()), scale=draw(scales), specials=draw(specials), g=draw(g_scalars),
                seed=draw(seeds))


def soft_target(kind, b, c, gen):
    """Non-negative targets [B, C] (float32): rows that sum to 1 or not, one-hot, zero rows, sparse."""
    if kind == "prob":
        return torch.softmax(torch.randn(b, c, generator=gen) * 2, -1)
    if kind == "onehot":
        return torch.nn.functional.one_hot(torch.randint(0, c, (b,), generator=gen), c).float()
    t = torch.rand(b, c, generator=gen) * 2
    if kind == "zero-rows":
        t[torch.rand(b, generator=gen) < 0.3] = 0.0
    elif kind == "sparse":
        t[torch.rand(b, c, generator=gen) < 0.8] = 0.0
    return t


def soft_call(backend, s, z, t, g, exact=False):
    inplace = s["inplace"] and s["grad"] and not exact and backend != "reference"
    if exact:
        leaf, t = z.double().requires_grad_(s["grad"]), t.double()
    elif inplace:
        leaf = z.clone().requires_grad_(True)
    else:
        leaf, t = with_layout(z, s["layout"]).requires_grad_(s["grad"]), with_layout(t, s["t_layout"])
    x = leaf * 1 if inplace else leaf
    loss = dps_fast.soft_cross_entropy(x, t, reduction=s["reduction"], normalize=s["normalize"], backend=backend,
                                       inplace_grad=inplace)
    if s["grad"]:
        (loss * g.to(loss.dtype)).sum().backward()
    return loss.detach(), leaf.grad


def soft_example(backend, s):
    gen = torch.Generator().manual_seed(s["seed"])
    b, c = s["b"], s["c"]
    z = (torch.randn(1, b, c, generator=gen) * s["scale"]).to(DTYPES[s["zdt"]])
    z = apply_specials(z, s["specials"])[0]
    t = soft_target(s["target"], b, c, gen).to(DTYPES[s["tdt"]])
    g = upstream((b,), s["reduction"], gen, s["g"]).float()
    lk, gk = soft_call(backend, s, z, t, g)
    le, ge = soft_call("reference", s, z, t, g)
    lx, gx = soft_call("reference", s, z, t, g, exact=True)
    assert lk.dtype == torch.float32 and lk.shape == le.shape
    terms = dps_fast.soft_cross_entropy(z.double(), t.double(), "none", s["normalize"], backend="reference")
    tsum = torch.ones(b) if s["normalize"] else t.double().sum(-1)
    mag = term_magnitude(z[None], terms[None], tsum[None])[0]
    loss_check(lk, le, lx, mag, s["reduction"], "loss")
    if s["grad"]:
        assert gk.dtype == z.dtype and gk.shape == z.shape
        rule_check(gk, ge, gx, z.dtype, "grad")


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_soft_cross_entropy_matches_reference(case):
    backend = case[0]
    run_property(soft_specs(), lambda s: soft_example(backend, s), BUDGET["soft"][backend], weight=0.6)


# =============================================================================== supcon_loss
@st.composite
def supcon_specs(draw):
    v = draw(st.sampled_from([0, 1, 2, 3]))  # 0: flat features [M, d]
    b = draw(st.integers(0, 64 if v else 128))
    mode = draw(st.sampled_from(["labels", "views", "soft"]))
    if mode == "views" and v < 2:
        mode = "labels"
    return dict(v=v, b=b, d=draw(st.integers(1, 64)), dt=draw(dtype_names), layout=draw(st.sampled_from(LAYOUTS)),
                mode=mode, per_row=draw(st.booleans()) if v else True, n_labels=draw(st.integers(1, 12)),
                label_dtype=draw(st.sampled_from(sorted(INDEX_DTYPES))), k=draw(st.integers(1, 8)),
                soft_dt=draw(dtype_names), soft_zero=draw(st.booleans()), tau=draw(st.floats(0.05, 2.0)),
                normalize=draw(st.booleans()), scale=draw(st.sampled_from([0.1, 1.0, 3.0])), grad=draw(st.booleans()),
                seed=draw(seeds))


def supcon_inputs(s):
    gen = torch.Generator().manual_seed(s["seed"])
    v, b, d = s["v"], s["b"], s["d"]
    shape = (v, b, d) if v else (b, d)
    f = (torch.randn(shape, generator=gen) * s["scale"]).to(DTYPES[s["dt"]])
    rows = b * v if v and s["per_row"] else b
    kw = {}
    if s["mode"] == "labels":
        kw["labels"] = torch.randint(0, s["n_labels"], (rows,), generator=gen).to(INDEX_DTYPES[s["label_dtype"]][0])
    elif s["mode"] == "soft":
        soft = torch.rand(rows, s["k"], generator=gen)
        if s["soft_zero"] and rows:
            soft[torch.rand(rows, generator=gen) < 0.3] = 0.0
        kw["soft_targets"] = soft.to(DTYPES[s["soft_dt"]])
    return f, kw


def supcon_call(backend, s, f, kw, exact=False):
    if exact:
        f = f.double()
        kw = {k: (x.double() if x.is_floating_point() else x) for k, x in kw.items()}
    x = (f.clone() if exact else with_layout(f, s["layout"])).requires_grad_(s["grad"])
    loss = dps_fast.supcon_loss(x, tau=s["tau"], normalize=s["normalize"], backend=backend, **kw)
    if s["grad"]:
        (loss * 0.8).backward()
    return loss.detach(), x.grad


def supcon_example(backend, s):
    f, kw = supcon_inputs(s)
    lk, gk = supcon_call(backend, s, f, kw)
    le, ge = supcon_call("reference", s, f, kw)
    lx, gx = supcon_call("reference", s, f, kw, exact=True)
    assert lk.dtype == torch.float32 and lk.shape == ()
    # the similarities s / tau carry the rounding: scale by their largest magnitude
    fmax = float(f.double().norm(dim=-1).max()) if f.numel() else 1.0
    scale = (1.0 if s["normalize"] else fmax ** 2) / s["tau"]
    rule_check(lk, le, lx, torch.float32, "loss", scale=scale)
    if s["grad"]:
        assert gk.dtype == f.dtype and gk.shape == f.shape
        rule_check(gk, ge, gx, f.dtype, "grad", scale=max(scale, float(gx.abs().max()) if gx.numel() else 1.0))


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_supcon_loss_matches_reference(case):
    backend = case[0]
    run_property(supcon_specs(), lambda s: supcon_example(backend, s), BUDGET["supcon"][backend], weight=0.6)


# =============================================================================== DPSLoss (local, host)
@st.composite
def module_specs(draw):
    con = draw(st.sampled_from([0.0, 0.0, 0.4]))
    kind = draw(st.sampled_from(["local", "host"]))
    v, c = draw(st.sampled_from([0, 1, 2, 3])), draw(classes(300))
    b = draw(st.integers(0, 32))
    validate = draw(st.booleans()) if kind == "local" else True
    return dict(kind=kind, v=v, b=b, c=c, n=b + draw(st.integers(0, 12)), d=draw(st.integers(1, 16)),
                zdt=draw(dtype_names), adt=draw(dtype_names), gamma=draw(gammas), tau_e=draw(taus),
                target=draw(st.sampled_from(["posterior", "prior"])),
                reduction=draw(st.sampled_from(["mean", "sum"]) if con else reductions), con=con,
                positives=draw(st.sampled_from(["hard", "soft", "views"] if v >= 2 else ["hard", "soft"])),
                con_tau=draw(st.floats(0.05, 1.0)), validate=validate,
                valid=draw(st.sampled_from(["none", "mask", "repeats"])),
                outside=[] if validate else draw(st.lists(st.tuples(st.integers(0, 31), st.integers(-3, 3)),
                                                          max_size=2)),
                steps=draw(st.lists(st.tuples(st.booleans(), seeds), min_size=1, max_size=2)),
                specials=draw(specials), scale=draw(scales), prior=draw(st.sampled_from([(100.0, 0.01), (4.0, 0.5)])),
                seed=draw(seeds))


def module_batch(s, gen):
    """(z3 [V, B, C], features [V', B, d], ids, valid or None) of one step."""
    v, b, c, n = max(s["v"], 1), s["b"], s["c"], s["n"]
    z3 = (torch.randn(v, b, c, generator=gen) * s["scale"]).to(DTYPES[s["zdt"]])
    apply_specials(z3, s["specials"])
    feats = torch.randn(v, b, s["d"], generator=gen).to(z3.dtype)
    ids = torch.randperm(max(n, 1), generator=gen)[:b]
    valid = None
    if s["valid"] != "none" and s["validate"]:
        valid = torch.rand(b, generator=gen) < 0.7
        if s["valid"] == "repeats" and b:  # padding repeats: invalid samples may repeat any id
            ids = torch.where(valid, ids, torch.randint(0, max(n, 1), (b,), generator=gen))
    for pos, k in s["outside"]:
        if b:
            ids[pos % b] = k if k < 0 else n + k
    return z3, feats, ids, valid


def module_make(s, prior, dtype, backend):
    return dps_fast.DPSLoss(prior=prior, bank_dtype=dtype, gamma=s["gamma"], tau_e=s["tau_e"], target=s["target"],
                            reduction=s["reduction"], contrastive_weight=s["con"], con_tau=s["con_tau"],
                            con_positives=s["positives"], backend=backend, bank=s["kind"], validate=s["validate"])


def module_call(crit, s, z3, feats, ids, valid, g, train, exact=False):
    crit.train(train)
    z = z3 if s["v"] else z3[0]
    x = (z.double() if exact else z.clone()).requires_grad_(True)
    f = (feats.double() if exact else feats.clone()).requires_grad_(True)
    loss = crit(x, ids, f if s["con"] else None, valid)
    (loss * g.to(loss.dtype)).sum().backward()
    return loss.detach(), x.grad, f.grad if s["con"] else None, crit.alpha.clone()


def module_step(backend, s, crit, train, seed):
    gen = torch.Generator().manual_seed(seed)
    z3, feats, ids, valid = module_batch(s, gen)
    g = upstream(z3.shape[:-1] if s["v"] else z3.shape[1:-1], s["reduction"], gen, 0.7).float()
    before = crit.alpha.clone()
    eager = module_make(s, before, before.dtype, "reference")
    exact = module_make(s, before.double(), torch.float64, "reference")
    lk, gk, fk, ak = module_call(crit, s, z3, feats, ids, valid, g, train)
    le, ge, fe, ae = module_call(eager, s, z3, feats, ids, valid, g, train)
    lx, gx, fx, ax = module_call(exact, s, z3, feats, ids, valid, g, train, exact=True)
    rows = torch.zeros(s["n"], dtype=torch.bool)
    ok = (ids >= 0) & (ids < s["n"]) & finite_rows(z3) & (valid if valid is not None else True)
    if train:
        rows[ids[ok]] = True
    assert_only_changed(ak, before, rows[:, None].expand_as(before), f"{s['kind']} bank ({backend})")
    assert_only_changed(ae, before, rows[:, None].expand_as(before), f"{s['kind']} bank (reference)")
    rule_check(ak, ae, ax, before.dtype, "bank")
    assert lk.dtype == torch.float32 and lk.shape == le.shape
    # |logsumexp| + |<t, z>| <= 2 max|z| + log C per term, plus the contrastive term's similarities
    zmag = z3.double().abs().nan_to_num(0.0, 0.0, 0.0).amax(-1)
    con = s["con"] * (2 / s["con_tau"] + math.log(max(2, feats.shape[0] * s["b"])))
    mag = (zmag * 2 + math.log(s["c"]) + con).reshape(lx.shape if s["reduction"] == "none" else -1)
    loss_check(lk, le, lx, mag, s["reduction"], "loss")
    rule_check(gk, ge, gx, gk.dtype, "logits grad")
    if s["con"]:
        fmax = float(fx.abs().max()) if fx.numel() else 1.0
        rule_check(fk, fe, fx, fk.dtype, "features grad", scale=max(1.0, fmax) / s["con_tau"])


def module_example(backend, s):
    gen = torch.Generator().manual_seed(s["seed"])
    cp, ep = s["prior"]
    prior = dps_fast.init_prior(torch.randint(0, s["c"], (s["n"],), generator=gen), s["c"], c=cp, eps=ep,
                                dtype=DTYPES[s["adt"]])
    crit = module_make(s, prior, prior.dtype, backend)
    for train, seed in s["steps"]:
        module_step(backend, s, crit, train, seed)


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_dps_loss_module_matches_reference(case):
    backend = case[0]
    run_property(module_specs(), lambda s: module_example(backend, s), BUDGET["module"][backend])


# =============================================================================== invalid input
def _set_id(a, value):
    idx = a["index"].clone()
    idx[0] = value
    return dict(a, index=idx)


def _dup_id(a):
    idx = a["index"].clone()
    idx[-1] = idx[0]
    return dict(a, index=idx)


def _aliased_bank(a):
    z = a["logits"]
    buf = torch.ones(z.numel() + a["alpha"].numel(), dtype=torch.float32)
    buf[:z.numel()] = z.reshape(-1).float()
    return dict(a, logits=buf[:z.numel()].view(z.shape), alpha=buf[z.numel():].view(a["alpha"].shape))


# name -> (applies to (b, c, n), corruption of the call's arguments)
DPS_BAD = {
    "id >= N": (lambda b, c, n: b >= 1, lambda a: _set_id(a, a["alpha"].shape[0])),
    "negative id": (lambda b, c, n: b >= 1, lambda a: _set_id(a, -1)),
    "duplicate id": (lambda b, c, n: b >= 2, _dup_id),
    "float index": (lambda b, c, n: True, lambda a: dict(a, index=a["index"].float())),
    "bool index": (lambda b, c, n: True, lambda a: dict(a, index=a["index"] > 0)),
    "2-d index": (lambda b, c, n: True, lambda a: dict(a, index=a["index"][None])),
    "index too long": (lambda b, c, n: b > 0, lambda a: dict(a, index=torch.cat([a["index"], a["index"][:1] * 0 + 1]))),
    "index on meta": (lambda b, c, n: True, lambda a: dict(a, index=a["index"].to("meta"))),
    "integer logits": (lambda b, c, n: True, lambda a: dict(a, logits=a["logits"].to(torch.int32))),
    "1-d logits": (lambda b, c, n: True, lambda a: dict(a, logits=a["logits"].reshape(-1))),
    "4-d logits": (lambda b, c, n: True, lambda a: dict(a, logits=a["logits"][None, None])),
    "no views": (lambda b, c, n: True, lambda a: dict(a, logits=torch.empty(0, b_(a), c_(a)))),
    "no classes": (lambda b, c, n: True, lambda a: dict(a, logits=a["logits"][..., :0], alpha=a["alpha"][:, :0])),
    "class mismatch": (lambda b, c, n: True, lambda a: dict(a, alpha=torch.ones(a["alpha"].shape[0], c_(a) + 1))),
    "1-d bank": (lambda b, c, n: True, lambda a: dict(a, alpha=a["alpha"].reshape(-1))),
    "integer bank": (lambda b, c, n: True, lambda a: dict(a, alpha=a["alpha"].to(torch.int32))),
    "bank class stride": (lambda b, c, n: c >= 2 and n >= 2, lambda a: dict(a, alpha=a["alpha"].t().contiguous().t())),
    "expanded bank": (lambda b, c, n: n >= 2, lambda a: dict(a, alpha=a["alpha"][:1].expand(a["alpha"].shape))),
    "bank aliases logits": (lambda b, c, n: b >= 1, _aliased_bank),
    "bank on meta": (lambda b, c, n: True, lambda a: dict(a, alpha=a["alpha"].to("meta"))),
    "gamma 0": (lambda b, c, n: True, lambda a: dict(a, gamma=0.0)),
    "gamma > 1": (lambda b, c, n: True, lambda a: dict(a, gamma=1.5)),
    "gamma nan": (lambda b, c, n: True, lambda a: dict(a, gamma=float("nan"))),
    "gamma bool": (lambda b, c, n: True, lambda a: dict(a, gamma=True)),
    "gamma str": (lambda b, c, n: True, lambda a: dict(a, gamma="0.9")),
    "tau_e 0": (lambda b, c, n: True, lambda a: dict(a, tau_e=0.0)),
    "tau_e < 0": (lambda b, c, n: True, lambda a: dict(a, tau_e=-1.0)),
    "tau_e inf": (lambda b, c, n: True, lambda a: dict(a, tau_e=float("inf"))),
    "tau_e nan": (lambda b, c, n: True, lambda a: dict(a, tau_e=float("nan"))),
    "tau_e tiny": (lambda b, c, n: True, lambda a: dict(a, tau_e=1e-39)),
    "target": (lambda b, c, n: True, lambda a: dict(a, target="mode")),
    "reduction": (lambda b, c, n: True, lambda a: dict(a, reduction="avg")),
    "logits not a tensor": (lambda b, c, n: True, lambda a: dict(a, logits=a["logits"].tolist())),
}


def b_(a):
    return a["logits"].shape[-2]


def c_(a):
    return a["logits"].shape[-1]


@st.composite
def bad_dps_specs(draw):
    b, c = draw(st.integers(0, 6)), draw(st.integers(1, 9))
    n = b + draw(st.integers(0, 4))
    bad = draw(st.sampled_from(sorted(k for k, (ok, _) in DPS_BAD.items() if ok(b, c, n))))
    return dict(b=b, c=c, n=n, v=draw(st.sampled_from([0, 2])), bad=bad, adt=draw(dtype_names),
                update=draw(st.booleans()), seed=draw(seeds))


def outcome(call):
    """(exception type, message) of call(), or (None, None) if it returned."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e), str(e)
    return None, None


def same_failure(backend, call_with, state):
    """call_with(backend) and call_with("reference") raise the same exception, and neither
    changes ``state()`` (the bank)."""
    got = {}
    for name in (backend, "reference"):
        before = state().clone()
        got[name] = outcome(lambda: call_with(name))
        assert torch.equal(state(), before), f"{name}: a failed call changed the bank"
    assert got["reference"][0] is not None, "the corrupted call did not raise in the reference"
    assert got[backend] == got["reference"], f"{backend} raised {got[backend]}, the reference {got['reference']}"


def bad_dps_example(backend, s):
    gen = torch.Generator().manual_seed(s["seed"])
    b, c, n = s["b"], s["c"], s["n"]
    z = torch.randn((s["v"], b, c) if s["v"] else (b, c), generator=gen)
    alpha = dps_fast.init_prior(torch.randint(0, c, (n,), generator=gen), c, dtype=DTYPES[s["adt"]])
    base = dict(logits=z, index=torch.randperm(max(n, 1), generator=gen)[:b], alpha=alpha, update=s["update"])
    args = DPS_BAD[s["bad"]][1](dict(base))
    bank = args["alpha"] if isinstance(args["alpha"], torch.Tensor) and args["alpha"].device.type != "meta" else alpha
    same_failure(backend, lambda name: dps_fast.dps_cross_entropy(backend=name, **args), lambda: bank)


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_dps_cross_entropy_invalid_input_same_error_no_write(case):
    backend = case[0]
    run_property(bad_dps_specs(), lambda s: bad_dps_example(backend, s), 100, weight=0.2)


SOFT_BAD = {
    "target shape": lambda z, t: (z, t[..., :-1] if t.shape[-1] > 1 else torch.cat([t, t], -1), {}),
    "integer target": lambda z, t: (z, t.long(), {}),
    "target on meta": lambda z, t: (z, t.to("meta"), {}),
    "target not a tensor": lambda z, t: (z, t.tolist(), {}),
    "3-d logits": lambda z, t: (z[None], t[None], {}),
    "integer logits": lambda z, t: (z.long(), t, {}),
    "no classes": lambda z, t: (z[:, :0], t[:, :0], {}),
    "reduction": lambda z, t: (z, t, {"reduction": "avg"}),
}
SUPCON_BAD = {
    "tau 0": lambda f, kw: (f, dict(kw, tau=0.0)),
    "tau < 0": lambda f, kw: (f, dict(kw, tau=-0.1)),
    "tau inf": lambda f, kw: (f, dict(kw, tau=float("inf"))),
    "tau bool": lambda f, kw: (f, dict(kw, tau=True)),
    "labels length": lambda f, kw: (f, dict(kw, labels=torch.zeros(f.shape[0] * f.shape[1] + 1, dtype=torch.long))),
    "float labels": lambda f, kw: (f, dict(kw, labels=torch.zeros(f.shape[1]))),
    "2-d labels": lambda f, kw: (f, dict(kw, labels=torch.zeros(1, f.shape[1], dtype=torch.long))),
    "labels and soft": lambda f, kw: (f, dict(kw, labels=torch.zeros(f.shape[1], dtype=torch.long),
                                              soft_targets=torch.ones(f.shape[1], 2))),
    "soft rows": lambda f, kw: (f, dict(kw, soft_targets=torch.ones(f.shape[0] * f.shape[1] + 1, 2))),
    "1-d soft": lambda f, kw: (f, dict(kw, soft_targets=torch.ones(f.shape[1]))),
    "flat without labels": lambda f, kw: (f[0], {}),
    "1-d features": lambda f, kw: (f.reshape(-1), kw),
    "4-d features": lambda f, kw: (f[None], kw),
    "no feature dims": lambda f, kw: (f[..., :0], kw),
    "integer features": lambda f, kw: (f.long(), kw),
    "labels on meta": lambda f, kw: (f, dict(kw, labels=torch.zeros(f.shape[1], dtype=torch.long, device="meta"))),
}


@st.composite
def bad_small_specs(draw, table):
    return dict(b=draw(st.integers(0, 6)), c=draw(st.integers(1, 9)), bad=draw(st.sampled_from(sorted(table))),
                dt=draw(dtype_names), seed=draw(seeds))


def bad_soft_example(backend, s):
    gen = torch.Generator().manual_seed(s["seed"])
    z = torch.randn(s["b"], s["c"], generator=gen).to(DTYPES[s["dt"]])
    z, t, kw = SOFT_BAD[s["bad"]](z, torch.rand(s["b"], s["c"], generator=gen))
    same_failure(backend, lambda name: dps_fast.soft_cross_entropy(z, t, backend=name, **kw), lambda: torch.zeros(1))


def bad_supcon_example(backend, s):
    gen = torch.Generator().manual_seed(s["seed"])
    f, kw = SUPCON_BAD[s["bad"]](torch.randn(2, s["b"], s["c"], generator=gen).to(DTYPES[s["dt"]]), {})
    same_failure(backend, lambda name: dps_fast.supcon_loss(f, backend=name, **kw), lambda: torch.zeros(1))


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_soft_ce_and_supcon_invalid_input_same_error(case):
    backend = case[0]
    run_property(bad_small_specs(SOFT_BAD), lambda s: bad_soft_example(backend, s), 40, weight=0.1)
    run_property(bad_small_specs(SUPCON_BAD), lambda s: bad_supcon_example(backend, s), 50, weight=0.1)


# name -> (applies to b, the corrupted (logits, index, features, valid))
MODULE_BAD = {
    "id >= N": (1, lambda z, i, f, m, n: (z, torch.cat([i[:-1], i[-1:] * 0 + n]), f, m)),
    "negative id": (1, lambda z, i, f, m, n: (z, torch.cat([i[:-1], i[-1:] * 0 - 1]), f, m)),
    "duplicate valid id": (2, lambda z, i, f, m, n: (z, torch.cat([i[:-1], i[:1]]), f, torch.ones_like(m))),
    "float index": (0, lambda z, i, f, m, n: (z, i.float(), f, m)),
    "index on meta": (0, lambda z, i, f, m, n: (z, i.to("meta"), f, m)),
    "class mismatch": (0, lambda z, i, f, m, n: (torch.cat([z, z[..., :1]], -1), i, f, m)),
    "integer logits": (0, lambda z, i, f, m, n: (z.long(), i, f, m)),
    "1-d logits": (0, lambda z, i, f, m, n: (z.reshape(-1), i, f, m)),
    "missing features": (0, lambda z, i, f, m, n: (z, i, None, m)),
    "features batch": (1, lambda z, i, f, m, n: (z, i, torch.cat([f, f[:, :1]], 1), m)),
    "2-d features": (0, lambda z, i, f, m, n: (z, i, f[0], m)),
    "one view for views": (0, lambda z, i, f, m, n: (z, i, f[:1], m)),
    "valid dtype": (0, lambda z, i, f, m, n: (z, i, f, m.float())),
    "valid shape": (0, lambda z, i, f, m, n: (z, i, f, torch.ones(m.shape[0] + 1, dtype=torch.bool))),
}


@st.composite
def bad_module_specs(draw):
    b = draw(st.integers(0, 6))
    return dict(kind=draw(st.sampled_from(["local", "host"])), b=b, c=draw(st.integers(1, 6)),
                n=b + draw(st.integers(0, 4)), v=draw(st.sampled_from([1, 2])),
                bad=draw(st.sampled_from(sorted(k for k, (lo, _) in MODULE_BAD.items() if b >= lo))),
                train=draw(st.booleans()), seed=draw(seeds))


def bad_module_example(backend, s):
    gen = torch.Generator().manual_seed(s["seed"])
    b, c, n, v = s["b"], s["c"], s["n"], s["v"]
    labels = torch.randint(0, c, (n,), generator=gen)
    z, i, f, m = MODULE_BAD[s["bad"]][1](torch.randn(v, b, c, generator=gen), torch.randperm(max(n, 1), generator=gen)[:b],
                                         torch.randn(2, b, 3, generator=gen), torch.rand(b, generator=gen) < 0.5, n)
    crits = {name: dps_fast.DPSLoss(labels, c, backend=name, bank=s["kind"], contrastive_weight=0.3,
                                    con_positives="views").train(s["train"]) for name in (backend, "reference")}
    same_failure(backend, lambda name: crits[name](z, i, f, m), lambda: crits[backend].alpha)
    assert torch.equal(crits["reference"].alpha, crits[backend].alpha)


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_dps_loss_module_invalid_input_same_error_no_write(case):
    backend = case[0]
    run_property(bad_module_specs(), lambda s: bad_module_example(backend, s), 60, weight=0.2)


# =============================================================================== regressions: the bugs these properties found
# Each was found by the properties above (a strict xfail until its fix); the minimal example stays.
@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_regression_finite_logits_near_flt_max_update_the_bank(case):
    """The fused kernels used to detect non-finite logits by summing the row: a sum of finite logits
    near FLT_MAX overflowed, and the row was treated as non-finite (NaN loss, no update), against
    docs/method.md §9. They now check each element (max, min and the exp sum)."""
    backend, device = case
    z = torch.tensor([[FLT_MAX, FLT_MAX]], device=device)
    alpha, want_alpha = torch.ones(1, 2, device=device), torch.ones(1, 2, device=device)
    got = dps_fast.dps_cross_entropy(z, torch.tensor([0], device=device), alpha, reduction="none", backend=backend)
    want = dps_fast.dps_cross_entropy(z, torch.tensor([0], device=device), want_alpha, reduction="none",
                                      backend="reference")
    torch.testing.assert_close(alpha, want_alpha)  # [1.45, 1.45]: the row is updated
    # FLT_MAX + log 2 - FLT_MAX: finite, with float32 rounding at the scale of the logits
    exact = dps_fast.dps_cross_entropy(z.double().cpu(), torch.tensor([0]), torch.ones(1, 2, dtype=torch.float64),
                                       reduction="none", backend="reference")
    assert torch.isfinite(got).all()
    rule_check(got.cpu(), want.cpu(), exact, torch.float32, "loss", scale=2 * FLT_MAX)


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_regression_soft_ce_of_finite_logits_near_flt_max_is_not_nan(case):
    """The same in soft_cross_entropy: lane sums of inf - inf (CPU) and an overflowing row sum
    (Triton / CUDA) used to make a finite row NaN; the reference is finite."""
    backend, device = case
    z = torch.zeros(2, 16, device=device)
    z[0, :8] = FLT_MAX / 2                                      # the sum overflows to +inf (Triton, CUDA)
    z[1, 0] = z[1, 8] = FLT_MAX                                 # +inf and -inf in two vector lanes: NaN (CPU)
    z[1, 1] = z[1, 9] = -FLT_MAX
    t = torch.full((2, 16), 1.0 / 16, device=device)
    got = dps_fast.soft_cross_entropy(z, t, reduction="none", backend=backend)
    want = dps_fast.soft_cross_entropy(z, t, reduction="none", backend="reference")
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_regression_soft_ce_minus_inf_logit_follows_the_reference(case):
    """A row with a -inf logit: the backends used to disagree (reference and CPU +inf, Triton / CUDA
    NaN). docs/method.md §9 now states one policy for both ops: a row with any NaN or +-inf logit gets
    a NaN loss and gradient, in every backend."""
    backend, device = case
    out = {}
    for name in (backend, "reference"):
        z = torch.tensor([[float("-inf"), 0.0]], device=device, requires_grad=True)
        loss = dps_fast.soft_cross_entropy(z, torch.tensor([[0.5, 0.5]], device=device), backend=name)
        loss.backward()
        out[name] = (loss.detach(), z.grad)
    assert torch.isnan(out["reference"][0]) and torch.isnan(out["reference"][1]).all()
    torch.testing.assert_close(out[backend][0], out["reference"][0], equal_nan=True)
    torch.testing.assert_close(out[backend][1], out["reference"][1], equal_nan=True)


@pytest.mark.parametrize("backend", ["reference"] + [c[0] for c in FUSED if c[1] == "cpu"])
def test_regression_banks_sliced_from_wider_tensors_are_accepted(backend):
    """dps_fast/_validate.py::bank_storage used to refuse every bank for which
    torch._debug_has_internal_overlap(alpha) != 0, but PyTorch answers 2 (TooHard) for any non-dense
    layout: a column slice big[:, :C] or big[::2] was refused though its rows are disjoint. Now only
    1 (Yes) is refused, plus rows that overlap (N > 1 and stride(0) < C, with stride(1) == 1)."""
    for big, alpha in ((torch.ones(3, 5), lambda t: t[:, 1:3]), (torch.ones(6, 2), lambda t: t[::2])):
        before = big.clone()
        dps_fast.dps_cross_entropy(torch.zeros(2, 2), torch.tensor([0, 2]), alpha(big), backend=backend)
        changed = (big != before).any(1)
        assert int(changed.sum()) == 2  # the two rows of the batch, nothing else


def test_regression_reference_tempered_evidence_of_huge_logits_keeps_the_bank_finite():
    """The reference used to take softmax(z / tau_e): with tau_e < 1 a finite |z| near FLT_MAX
    overflowed in float32 and the bank row became NaN (docs/method.md §9: never). It now takes
    softmax((z - max z) / tau_e), as the kernels do."""
    alpha = torch.ones(1, 2)
    loss = dps_fast.dps_cross_entropy(torch.tensor([[FLT_MAX, 0.0]]), torch.tensor([0]), alpha, tau_e=0.5,
                                      reduction="none", backend="reference")
    exact = torch.ones(1, 2, dtype=torch.float64)
    want = dps_fast.dps_cross_entropy(torch.tensor([[FLT_MAX, 0.0]], dtype=torch.float64), torch.tensor([0]), exact,
                                      tau_e=0.5, reduction="none", backend="reference")
    assert torch.isfinite(alpha).all(), f"bank row {alpha.tolist()}"
    torch.testing.assert_close(alpha.double(), exact)  # [1.95, 0.95]
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["reference"] + [c[0] for c in FUSED if c[1] == "cpu"])
def test_regression_unvalidated_outside_id_with_contrastive_term_is_skipped(backend):
    """docs/method.md §9: with validate=False an id outside [0, N) is skipped (its row untouched, its loss
    NaN). DPSLoss._contrastive used to read the batch's rows with the raw ids after the step, and raised
    IndexError after the bank had been written."""
    crit = dps_fast.DPSLoss(torch.tensor([0, 1]), 2, contrastive_weight=0.4, validate=False, backend=backend)
    twin = dps_fast.DPSLoss(torch.tensor([0, 1]), 2, validate=False, backend=backend)
    loss = crit(torch.zeros(2, 2), torch.tensor([0, 5]), torch.randn(1, 2, 3))
    want = twin(torch.zeros(2, 2), torch.tensor([0, 5]))
    assert torch.isnan(loss) and torch.isnan(want)  # the outside id's loss is NaN, so is the mean
    assert torch.equal(crit.alpha, twin.alpha)  # row 0 updated, row 1 untouched

"""The eager fast path's contract (dps_fast/_contract.py) is one declaration: the generated
C++ header is current, the op's schema is the declared one, and at each edge of the declared
domain the C++ filter and the Python checks agree: a value inside is taken by both (bit for bit
the same result), a value just outside is declined by the op and refused by the Python path."""
import math
import os

import pytest
import torch

import dps_fast
from dps_fast import _contract as contract
from dps_fast import _fast_path, _validate
from _helpers import HAS_CPU, python_path_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generated_header_is_current():
    with open(os.path.join(ROOT, contract.HEADER)) as f:
        assert f.read() == contract.cpp_header(), "run `python dps_fast/_contract.py` to regenerate the header"


def test_python_checks_read_the_declaration():
    assert tuple(_validate.REDUCTIONS) == contract.REDUCTIONS
    assert list(_validate.REDUCTIONS.values()) == list(range(len(contract.REDUCTIONS)))
    assert _validate.TARGETS == contract.TARGETS
    assert [str(d).removeprefix("torch.") for d in _validate.FUSED_DTYPES] == list(contract.FUSED_DTYPES)
    assert [str(d).removeprefix("torch.") for d in _validate.INT_DTYPES] == list(contract.INDEX_DTYPES)
    assert contract.TAU_E_MIN == torch.finfo(torch.float32).tiny == _validate.MIN_TAU_E


@pytest.mark.skipif(not HAS_CPU, reason="the C++ ops are not built")
def test_registered_schema_is_the_declared_one():
    assert str(torch.ops.dps_fast.dps_ce_eager.default._schema) == "dps_fast::" + contract.eager_schema()


def _inputs(logits_dtype=torch.float32, bank_dtype=torch.float32, index_dtype=torch.int64):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(5, 6, generator=g).to(logits_dtype)
    idx = torch.tensor([3, 0, 8, 1, 5]).to(index_dtype)
    bank = dps_fast.init_prior(torch.randint(0, 6, (9,), generator=g), 6).to(bank_dtype)
    return z, idx, bank


def _inside(**changes):
    """(name, keyword changes, tensor changes) for every declared value at the domain's edges."""
    cases = [(f"target {t}", dict(target=t), {}) for t in contract.TARGETS]
    cases += [(f"reduction {r}", dict(reduction=r), {}) for r in contract.REDUCTIONS]
    cases += [(f"backend {b}", dict(backend=b), {}) for b in contract.EAGER_BACKENDS]
    cases += [("gamma at its upper bound", dict(gamma=contract.GAMMA_HIGH), {}),
              ("gamma just above its lower bound", dict(gamma=math.nextafter(contract.GAMMA_LOW, 1.0)), {}),
              ("tau_e at its least", dict(tau_e=contract.TAU_E_MIN), {})]
    cases += [(f"{d} logits and bank", {}, dict(logits_dtype=getattr(torch, d), bank_dtype=getattr(torch, d)))
              for d in contract.FUSED_DTYPES]
    cases += [(f"{d} index", {}, dict(index_dtype=getattr(torch, d))) for d in contract.INDEX_DTYPES]
    return cases


OUTSIDE = [("target", dict(target="mean")), ("reduction", dict(reduction="max")),
           ("gamma above", dict(gamma=math.nextafter(contract.GAMMA_HIGH, 2.0))),
           ("gamma at the lower bound", dict(gamma=contract.GAMMA_LOW)),
           ("tau_e below its least", dict(tau_e=math.nextafter(contract.TAU_E_MIN, 0.0))),
           ("float64 bank", dict(alpha=_inputs(bank_dtype=torch.float64)[2])),
           ("bool index", dict(index=torch.ones(5, dtype=torch.bool)))]


def _call(**kw):
    args = dict(gamma=0.9, tau_e=1.0, target="posterior", reduction="mean", update=True, validate=True,
                backend=None)
    args.update(kw)
    return [args[name] for name, _ in contract.EAGER_ARGUMENTS[3:]]


@pytest.mark.skipif(not HAS_CPU, reason="the C++ ops are not built")
@pytest.mark.parametrize("name,changes,tensors", _inside(), ids=[c[0] for c in _inside()])
def test_declared_values_take_the_fast_path_bit_identically(monkeypatch, name, changes, tensors):
    z, idx, bank = _inputs(**tensors)
    fast_bank, slow_bank = bank.clone(), bank.clone()
    fast = torch.ops.dps_fast.dps_ce_eager.default(z, idx, fast_bank, *_call(**changes))  # declines would raise
    kw = dict(zip([n for n, _ in contract.EAGER_ARGUMENTS[3:]], _call(**changes)))
    with monkeypatch.context() as m:
        python_path_only(m)
        slow = dps_fast.dps_cross_entropy(z, idx, slow_bank, **kw)
    assert torch.equal(fast, slow) and torch.equal(fast_bank, slow_bank), name


@pytest.mark.skipif(not HAS_CPU, reason="the C++ ops are not built")
@pytest.mark.parametrize("name,changes", OUTSIDE, ids=[c[0] for c in OUTSIDE])
def test_values_outside_are_declined_by_the_op_and_refused_by_the_python_path(name, changes):
    z, idx, bank = _inputs()
    tensors = {"logits": z, "index": idx, "alpha": bank}
    tensors.update({k: v for k, v in changes.items() if k in tensors})
    scalars = {k: v for k, v in changes.items() if k not in tensors}
    before = tensors["alpha"].clone()
    with pytest.raises(NotImplementedError, match=contract.DECLINES):
        torch.ops.dps_fast.dps_ce_eager.default(tensors["logits"], tensors["index"], tensors["alpha"],
                                                *_call(**scalars))
    assert torch.equal(tensors["alpha"], before)
    if name == "float64 bank":  # the Python path runs it on the reference instead
        return
    kw = dict(zip([n for n, _ in contract.EAGER_ARGUMENTS[3:]], _call(**scalars)))
    with pytest.raises((ValueError, TypeError)):
        dps_fast.dps_cross_entropy(tensors["logits"], tensors["index"], tensors["alpha"], **kw)
    assert torch.equal(tensors["alpha"], before)
    assert _fast_path.plain_arguments(tensors["logits"], tensors["index"], tensors["alpha"], *_call(**scalars)) \
        == (name not in ("target", "reduction"))

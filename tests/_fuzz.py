"""Building blocks of the property-based tests (tests/test_properties.py): hypothesis
profiles and budgets, strategies for shapes and options, and tensors with odd layouts.

Each example draws a small dict of plain values (shapes, dtype names, options, a seed for
the tensor values), so a failing example prints as that dict and shrinks to small shapes.
"""
from __future__ import annotations

import os
import time

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# ---------------------------------------------------------------- profiles and budgets
# "default" (make test): a fixed number of examples per test and backend, derandomized, so
# CI is reproducible. "fuzz" (make fuzz, DPS_FAST_HYPOTHESIS_PROFILE=fuzz): random examples
# for DPS_FAST_FUZZ_SECONDS (times the test's weight) per test and backend, with the example
# database (a failure found once is replayed first next time); the examples run per test go
# to DPS_FAST_FUZZ_REPORT.
_COMMON = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("dps-default", derandomize=True, database=None, **_COMMON)
settings.register_profile("dps-fuzz", derandomize=False, **_COMMON)
FUZZ = os.environ.get("DPS_FAST_HYPOTHESIS_PROFILE", "default") == "fuzz"
PROFILE = settings.get_profile("dps-fuzz" if FUZZ else "dps-default")
FUZZ_SECONDS = float(os.environ.get("DPS_FAST_FUZZ_SECONDS", "90"))


def run_property(strategy, body, examples: int, weight: float = 1.0) -> None:
    """Runs ``body(spec)`` on specs drawn from ``strategy``: ``examples`` of them, or under
    the fuzz profile as many as fit in FUZZ_SECONDS * weight (batches of 100)."""
    done = [0]

    def counted(spec):
        body(spec)
        done[0] += 1

    def batch(n):
        settings(PROFILE, max_examples=n)(given(strategy)(counted))()

    if not FUZZ:
        batch(examples)
        return
    start = time.monotonic()
    try:
        while time.monotonic() - start < FUZZ_SECONDS * weight:
            batch(100)
    finally:
        _report(done[0], time.monotonic() - start)


def _report(examples: int, seconds: float) -> None:
    path = os.environ.get("DPS_FAST_FUZZ_REPORT")
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    if path:
        with open(path, "a") as f:
            f.write(f"{test}\t{examples} examples passed\t{seconds:.0f} s\n")


# ---------------------------------------------------------------- dtypes
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# name -> (dtype, smallest, largest value)
INDEX_DTYPES = {"i8": (torch.int8, -128, 127), "u8": (torch.uint8, 0, 255), "i16": (torch.int16, -2 ** 15, 2 ** 15 - 1),
                "i32": (torch.int32, -2 ** 31, 2 ** 31 - 1), "i64": (torch.int64, -2 ** 63, 2 ** 63 - 1)}
dtype_names = st.sampled_from(sorted(DTYPES))

# class counts around the CPU kernel's vector width (8), its 4-vector unroll (32) and
# its 1024-element chunks, and the Triton blocks (powers of two)
BOUNDARY_C = (1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1023, 1024,
              1025, 2047, 2048)


def classes(max_c: int = 2048):
    return st.one_of(st.integers(1, min(40, max_c)), st.sampled_from([c for c in BOUNDARY_C if c <= max_c]),
                     st.integers(1, max_c))


seeds = st.integers(0, 2 ** 31 - 1)

# ---------------------------------------------------------------- special values
SPECIAL_KINDS = ("nan", "inf", "-inf", "huge", "-huge", "huge-row", "-huge-row")
specials = st.lists(st.tuples(st.sampled_from(SPECIAL_KINDS), st.integers(0, 2 ** 16), st.integers(0, 2 ** 16),
                              st.integers(0, 2)), max_size=3)
huge_specials = st.lists(st.tuples(st.sampled_from(SPECIAL_KINDS[3:]), st.integers(0, 2 ** 16),
                                   st.integers(0, 2 ** 16), st.integers(0, 2)), max_size=3)


def special_value(kind: str, dtype: torch.dtype) -> float:
    big = torch.finfo(dtype).max
    return {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": big, "-huge": -big,
            "huge-row": big, "-huge-row": -big}[kind]


def apply_specials(z: torch.Tensor, spec) -> torch.Tensor:
    """Writes the special values of ``spec`` into z [V, B, C] (in place; positions modulo
    the shape). "huge-row" fills a whole row with the dtype's largest finite value."""
    v_, b_, c_ = z.shape
    if z.numel() == 0:
        return z
    for kind, b, c, v in spec:
        val = special_value(kind, z.dtype)
        if kind.endswith("-row"):
            z[v % v_, b % b_, :] = val
        else:
            z[v % v_, b % b_, c % c_] = val
    return z


def finite_rows(z3: torch.Tensor) -> torch.Tensor:
    """[B] True where every logit of the sample, in every view, is finite."""
    return torch.isfinite(z3.double()).all(-1).all(0)


# ---------------------------------------------------------------- layouts
LAYOUTS = ("contiguous", "transposed", "padded", "strided", "views-inner")


def with_layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x's values in a tensor with other strides: all dims reversed in memory, a slice of
    wider rows, every other row of a taller tensor, or (3-d) the views interleaved."""
    if kind == "transposed":
        perm = tuple(reversed(range(x.dim())))
        return x.permute(perm).contiguous().permute(perm)
    if kind == "padded":
        big = torch.full(x.shape[:-1] + (x.shape[-1] + 3,), 7.0, dtype=x.dtype)
        big[..., 1:1 + x.shape[-1]] = x
        return big[..., 1:1 + x.shape[-1]]
    if kind == "strided" and x.dim() >= 2:
        shape = list(x.shape)
        shape[-2] *= 2
        big = torch.full(shape, 7.0, dtype=x.dtype)
        big[..., ::2, :] = x
        return big[..., ::2, :]
    if kind == "views-inner" and x.dim() == 3:
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x.clone()


# ---------------------------------------------------------------- banks inside bigger tensors
def _column_slices_accepted() -> bool:
    """Whether the op takes a bank that is a column slice of a wider tensor (rows of stride
    > C: no overlap). It does not yet (tests/test_properties.py, the xfail test on bank
    layouts): until it does, the fuzzing leaves that layout out instead of failing on it."""
    import dps_fast

    try:
        dps_fast.dps_cross_entropy(torch.zeros(1, 2), torch.tensor([0]), torch.ones(2, 4)[:, :2],
                                   backend="reference")
        return True
    except ValueError:
        return False


BANK_LAYOUTS = ("contiguous", "rows", "transposed") + (("cols",) if _column_slices_accepted() else ())


def bank_container(alpha: torch.Tensor, kind: str) -> torch.Tensor:
    """A tensor that holds the bank somewhere inside it (bank_view reads it back); the
    cells outside the bank hold 3.0."""
    n, c = alpha.shape
    if kind == "rows":
        big = torch.full((n + 5, c), 3.0, dtype=alpha.dtype)
    elif kind == "cols":
        big = torch.full((n + 3, c + 4), 3.0, dtype=alpha.dtype)
    elif kind == "transposed" and c == 1:
        big = torch.full((1, n), 3.0, dtype=alpha.dtype)
    else:
        big = torch.full((n, c), 3.0, dtype=alpha.dtype)
    bank_view(big, kind, n, c).copy_(alpha)
    return big


def bank_view(big: torch.Tensor, kind: str, n: int, c: int) -> torch.Tensor:
    """The bank [n, c] inside ``big`` (a view, so writes land in ``big``)."""
    if kind == "rows":
        return big[2:2 + n]
    if kind == "cols":
        return big[1:1 + n, 2:2 + c]
    if kind == "transposed" and c == 1:
        return big.t()  # [n, 1] with strides (1, n)
    return big


def may_change(big: torch.Tensor, kind: str, n: int, c: int, rows: torch.Tensor) -> torch.Tensor:
    """Bool mask over ``big``: the cells of the bank rows ``rows`` ([n] bool)."""
    mask = torch.zeros(big.shape, dtype=torch.bool)
    bank_view(mask, kind, n, c)[rows] = True
    return mask


def bits(x: torch.Tensor) -> torch.Tensor:
    """x's bit patterns (an integer view), for bit-exact comparisons that NaN does not spoil."""
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def assert_only_changed(after: torch.Tensor, before: torch.Tensor, allowed: torch.Tensor, what: str) -> None:
    """Every cell outside ``allowed`` is bit-identical."""
    bad = (bits(after) != bits(before)) & ~allowed
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} cell(s) outside the updated rows changed"


# ---------------------------------------------------------------- index tensors
def index_dtype_for(name: str, lo: int, hi: int) -> bool:
    """Whether the index dtype ``name`` holds every value in [lo, hi]."""
    _, dmin, dmax = INDEX_DTYPES[name]
    return dmin <= lo and hi <= dmax


def upstream(shape, red: str, gen: torch.Generator, scalar: float) -> torch.Tensor:
    """A non-unit upstream gradient: one value per loss term (reduction none), else a scalar."""
    if red == "none":
        return torch.rand(shape, generator=gen, dtype=torch.float64) * 2.5 - 0.75
    return torch.tensor(scalar, dtype=torch.float64)

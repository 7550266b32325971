"""Shared test helpers (tests/ is put on sys.path by conftest.py)."""
import contextlib
import tempfile

import pytest
import torch  # noqa: E402

import dps_fast  # noqa: E402
from dps_fast import _dispatch  # noqa: E402


def fused_cases():
    """(backend, device) pairs to test the fused kernels on, on this machine."""
    cases = []
    for backend in ("cpu", "triton"):
        if _dispatch.available(backend, "cpu"):
            cases.append((backend, "cpu"))
    if torch.cuda.is_available():
        for backend in ("triton", "cuda"):
            if _dispatch.available(backend, "cuda"):
                cases.append((backend, "cuda"))
    return cases


FUSED = fused_cases()
HAS_CPU = ("cpu", "cpu") in FUSED  # the C++ ops are built and loaded
ALL_BACKENDS = [("reference", "cpu")] + FUSED


def case_id(c):
    return f"{c[0]}-{c[1]}"


def rule_check(got, eager, exact, out_dtype, what, extra_ulps=1.0, scale=None):
    """Tolerance rule: |got - exact| <= |eager - exact| + tol, with tol one ulp of
    the output dtype (plus 2e-6, relative) at the scale of the values (for a sum of
    n terms, pass scale = the sum of the terms' magnitudes)."""
    exact = exact.detach().to(torch.float64)
    if scale is None:
        scale = float(exact.abs().nan_to_num(0).max()) if exact.numel() else 1.0
    scale = max(1.0, scale)
    err_k = float((got.detach().to(torch.float64) - exact).abs().nan_to_num(0).max()) if exact.numel() else 0.0
    err_e = float((eager.detach().to(torch.float64) - exact).abs().nan_to_num(0).max()) if exact.numel() else 0.0
    tol = (extra_ulps * torch.finfo(out_dtype).eps + 2e-6) * scale
    assert err_k <= err_e + tol, f"{what}: kernel error {err_k:.3g} > eager error {err_e:.3g} + tol {tol:.3g}"
    nan_g = torch.isnan(got.detach()).to(torch.bool)
    nan_x = torch.isnan(exact)
    assert torch.equal(nan_g, nan_x), f"{what}: NaN pattern differs from the reference"


@pytest.fixture
def seed():
    torch.manual_seed(1234)
    return 1234


# The eager fast path (csrc/fast_path.cpp) in tests: switch it off, or count what it takes on.
def python_path_only(monkeypatch):
    monkeypatch.setattr(dps_fast._fast_path, "eager_op", lambda *args: None)


def eager_spy(monkeypatch):
    """Counts the calls that the eager op takes on (declines are not counted)."""
    taken = []
    real = dps_fast._fast_path.eager_op

    def spy(*args):
        op = real(*args)
        if op is None:
            return None

        def run(*call_args):
            out = op(*call_args)
            taken.append(1)
            return out
        return run
    monkeypatch.setattr(dps_fast._fast_path, "eager_op", spy)
    return taken


@contextlib.contextmanager
def one_rank_gloo():
    """A one-rank gloo process group (the distributed bank kinds on one process), torn down on
    exit; skips the test where torch.distributed has no gloo."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()

"""The CUDA kernel of the top-k step (csrc/cuda/topk_step.cu; docs/method.md §12, issue 26) run on
the CPU by tools/cuda_emulator against the reference step, as tests/test_topk_kernel.py checks the
CPU kernel: new ids, values, rest and bound, loss and gradient by the tolerance rule against the
float64 reference, over C, k, views, tau_e, targets, reductions, update, non-finite rows, ids
outside the bank and untouched rows; K' equal to the references' on tie-heavy inputs, step after
step. It has never run on a GPU (see tests/_cuda_emu.py for what emulation cannot show)."""
import functools

import pytest

from dps_fast import _dispatch
from dps_fast import topk as T
from _topk_cases import SETTINGS, check_ids_outside_are_skipped, check_tie_heavy, check_wide_row, compare_step

E = pytest.importorskip("_cuda_emu")
if E.unavailable():
    pytest.skip(f"CUDA emulator: {E.unavailable()}", allow_module_level=True)


@pytest.fixture(autouse=True)
def emulated_cuda_op(monkeypatch):
    """dps_fast/topk.py::fused_step(backend="cuda") calls the emulated kernel in place of the op."""
    found = _dispatch.op
    monkeypatch.setattr(_dispatch, "op", lambda name, op: E.topk_step if (name, op) == ("cuda", "topk_step")
                        else found(name, op))


emu_step = functools.partial(T.fused_step, backend="cuda")


CASES = [(2, 1, 1), (5, 2, 3), (7, 6, 2), (33, 20, 1), (100, 8, 3), (1000, 32, 3), (3000, 64, 1), (600, 256, 1)]


@pytest.mark.parametrize("c,k,views", CASES, ids=[f"C{c}-k{k}-V{v}" for c, k, v in CASES])
@pytest.mark.parametrize("target,reduction,update,tau_e", SETTINGS)
def test_emulated_cuda_step_matches_the_reference(c, k, views, target, reduction, update, tau_e):
    compare_step(emu_step, c, k, views, target, reduction, update, tau_e)


def test_emulated_cuda_ids_outside_the_bank_are_skipped():
    check_ids_outside_are_skipped(E.topk_step)


@pytest.mark.parametrize("c,k", [(10, 3), (100, 8), (33, 20), (7, 4)])
def test_emulated_cuda_tie_heavy_inputs_keep_the_references_classes(c, k):
    check_tie_heavy(emu_step, c, k)


def test_emulated_cuda_the_widest_row():
    """C = 32,768, the kernel's limit (int32 ids in a bank of more than 32,767 classes)."""
    check_wide_row(emu_step, T.CUDA_MAX_C)


def test_the_python_side_knows_the_kernels_limits():
    """dps_fast/topk.py takes the CUDA kernel only within its shared-memory limits: the constants
    must be csrc/cuda/topk_step.h's."""
    import os
    import re

    header = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda", "topk_step.h")).read()
    limits = {name: int(v) for name, v in re.findall(r"constexpr int (kTopkMax\w+) = (\d+);", header)}
    assert limits == {"kTopkMaxC": T.CUDA_MAX_C, "kTopkMaxK": T.CUDA_MAX_K, "kTopkMaxViews": T.CUDA_MAX_VIEWS}

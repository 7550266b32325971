"""The new-op checklist of docs/contributing.md, as a test: every op module declares what the
shared tests, the emulator and the benchmarks read from it, and every kernel op it declares has
its piece in every backend, the emulator and the suites. A new op that misses one fails here,
naming the file to write."""
import ast
import glob
import inspect
import os
import re

import pytest
import torch

from dps_fast import _registration
from dps_fast.ops import MODULES
from dps_fast.ops._common import BadInput, Kernel
from _helpers import HAS_CPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What each op module declares, and who reads it.
DECLARED = {
    "KERNELS": "registration (_registration.py), the Triton namespace, test_registration.py, test_cuda_emulated.py",
    "reference": "the oracle and fallback",
    "check": "the op's validation",
    "sample_call": "test_validation.py (the base of the bad inputs)",
    "bad_inputs": "test_validation.py (the same error in every backend)",
    "bytes_moved": "benchmarks/common.py, benchmarks/gpu_bench.py (GB/s)",
    "__all__": "dps_fast/__init__.py, dps_fast/functional.py",
}


def _defined_functions(pattern):
    names = set()
    for path in glob.glob(os.path.join(ROOT, pattern)):
        with open(path) as f:
            names |= {n.name for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.FunctionDef)}
    return names


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.__name__)
def test_every_op_module_declares_what_the_suites_read(mod):
    missing = [name for name in DECLARED if not hasattr(mod, name)]
    assert not missing, f"{mod.__name__} does not declare {missing} (read by: {[DECLARED[n] for n in missing]})"
    assert mod.KERNELS and all(isinstance(k, Kernel) for k in mod.KERNELS)
    bad = mod.bad_inputs()
    assert bad and all(isinstance(b, BadInput) for b in bad)
    public = getattr(mod, mod.__all__[0])
    loss = public(**mod.sample_call("cpu"), backend="reference")  # the sample call is valid
    assert torch.isfinite(loss).all()
    params = inspect.signature(public).parameters
    assert [b.what for b in bad if not set(b.changes) <= set(params)] == [], "a bad input changes no argument"


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.__name__)
def test_every_op_has_its_mirrored_test_property_test_and_benchmark(mod):
    stem = mod.__name__.rsplit(".", 1)[1]
    assert os.path.exists(os.path.join(ROOT, "tests", f"test_{stem}.py")), f"write tests/test_{stem}.py"
    assert os.path.exists(os.path.join(ROOT, "benchmarks", f"test_bench_{stem}.py")), \
        f"write benchmarks/test_bench_{stem}.py"
    properties = _defined_functions("tests/test_properties.py")
    for fn in mod.__all__:
        assert f"test_{fn}_matches_reference" in properties, f"tests/test_properties.py: test_{fn}_matches_reference"


@pytest.mark.parametrize("kernel", _registration.kernels(), ids=lambda k: k.name)
def test_every_kernel_op_has_each_backend_and_the_emulator(kernel):
    name = kernel.name
    assert f'"{name}(' in "".join(_read(p) for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))), \
        f"csrc/cpu/: no schema for {name}"
    assert name in _defined_functions("dps_fast/kernels/*.py"), f"dps_fast/kernels/: no Triton function {name}"
    glue = "".join(_read(p) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_glue.cpp")))
    assert f'm.impl("{name}"' in glue, f"csrc/cuda/*_glue.cpp: no CUDA registration of {name}"
    assert name in _defined_functions("tests/_cuda_emu.py"), f"tests/_cuda_emu.py: no mirror of {name}'s glue"
    if HAS_CPU:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dps_fast::{name}", "CPU")


def test_contributing_counts_what_a_new_op_touches():
    """docs/contributing.md's checklist names every file the checks above require, and its
    count is the number of files it lists."""
    text = _read("docs", "contributing.md")
    section = text.split("## Adding a fused op", 1)[1].split("\n## ", 1)[0]
    for needed in ("dps_fast/ops/foo.py", "csrc/cpu/foo.cpp", "dps_fast/kernels/foo.py", "csrc/cuda/foo.cu",
                   "csrc/cuda/foo.h", "csrc/cuda/foo_glue.cpp", "tests/_cuda_emu.py", "tests/test_foo.py",
                   "tests/test_properties.py", "benchmarks/test_bench_foo.py", "docs/method.md",
                   "dps_fast/__init__.py", "dps_fast/functional.py", "tools/cuda_emulator/capi.cpp"):
        assert f"`{needed}`" in section, f"docs/contributing.md's checklist does not name {needed}"
    listed = re.findall(r"^\d+\. `([^`]+)`", section, re.M)  # one file per numbered item
    assert len(set(listed)) == len(listed), f"a file is listed twice: {listed}"
    assert f"**{len(listed)} files**" in section, f"the checklist lists {len(listed)} files: {listed}"

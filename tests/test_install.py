"""Install paths (README "Install").

* pip's default, isolated build has no torch: its wheel is pure Python and carries
  the C++/CUDA sources, and the build environment never asks for torch;
* the first-import build compiles once into a cache keyed by sources, flags and
  compiler, shared safely by processes that import at the same time;
* a broken compiler leaves one actionable warning, and the reference backend.

What runs where: these tests compile one small translation unit (tens of seconds).
Compiling the real ops on first import takes minutes on this project's 2-core CI
machine, so that end-to-end check (fresh venvs, `pip install .` and `pip install -e .`,
fused 'cpu' backend against the reference) is `make install-check`, not pytest.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from dps_fast import _build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_PY = _build.__file__  # the installed copy, loaded by path in subprocesses

# Hides a prebuilt dps_fast._C, as in a wheel built without torch.
NO_PREBUILT = textwrap.dedent("""
    import sys
    class _NoPrebuilt:
        def find_spec(self, name, path=None, target=None):
            if name == "dps_fast._C":
                raise ModuleNotFoundError("No module named 'dps_fast._C'", name=name)
    sys.meta_path.insert(0, _NoPrebuilt())
""")


def _run(code, env=None, timeout=300):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd="/")


def test_flags_live_in_one_place():
    x86, arm = _build.cxx_flags("x86_64"), _build.cxx_flags("aarch64")
    assert {"-O3", "-fopenmp", "-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"} <= set(x86)
    assert not any(f.startswith("-mavx") or "AVX2" in f for f in arm)
    assert not [f for f in x86 + arm if f.startswith("-march") or f == "-ffast-math"]
    setup_py = open(os.path.join(REPO, "setup.py")).read()
    assert "-mavx2" not in setup_py and "-O3" not in setup_py, "setup.py must take its flags from _build"


def test_build_environment_does_not_ask_for_torch():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        requires = tomllib.load(f)["build-system"]["requires"]
    assert requires and not [r for r in requires if r.lower().startswith("torch")]


def test_isolated_wheel_is_pure_and_carries_the_sources(tmp_path):
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "build", "*.egg-info")
    for name in ("dps_fast", "csrc"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
                          str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    wheels = glob.glob(str(tmp_path / "dist" / "*.whl"))
    assert [os.path.basename(w) for w in wheels] == ["dps_fast-0.1.0-py3-none-any.whl"]
    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
        metadata = whl.read("dps_fast-0.1.0.dist-info/METADATA").decode()
    wanted = {"dps_fast/_build.py", "dps_fast/kernels/supcon.py", "dps_fast/csrc/ops.cpp",
              "dps_fast/csrc/cpu/row_kernels.h", "dps_fast/csrc/cpu/dps_cross_entropy.cpp",
              "dps_fast/csrc/cuda/dps_cross_entropy_glue.cpp", "dps_fast/csrc/cuda/dps_cross_entropy.cu"}
    assert wanted <= names, wanted - names
    assert not [n for n in names if n.endswith((".so", ".pyd"))]
    assert "Requires-Dist: ninja" in metadata


def test_cache_key_follows_sources_flags_and_compiler(tmp_path, monkeypatch):
    root = tmp_path / "csrc"
    shutil.copytree(_build.sources_root(), root)
    monkeypatch.setenv("DPS_FAST_CACHE_DIR", str(tmp_path / "cache"))
    key = _build.build_settings(torch, str(root), cuda=False)["dir"]
    assert key.startswith(str(tmp_path / "cache"))
    assert _build.build_settings(torch, str(root), cuda=False)["dir"] == key
    with open(root / "cpu" / "row_kernels.h", "a") as f:  # a header changes the key too
        f.write("\n")
    edited = _build.build_settings(torch, str(root), cuda=False)["dir"]
    assert edited != key
    monkeypatch.setenv("CXX", shutil.which("true") or "/bin/true")
    assert _build.build_settings(torch, str(root), cuda=False)["dir"] != edited


TINY_OP = """
#include <torch/library.h>
at::Tensor twice(const at::Tensor& x) { return x.mul(2); }
TORCH_LIBRARY(dps_fast_jit_test, m) {
  m.def("twice(Tensor x) -> Tensor");
  m.impl("twice", c10::DispatchKey::CPU, &twice);
}
"""

# A module.cpp in the sources: the JIT build imports its library as the module dps_fast._C too.
TINY_MODULE = """
#include <Python.h>
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&def);
}
"""

BUILD_TINY = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("b", {build_py!r})
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
b._build_and_load(torch, {root!r}, cuda=False)
print(torch.ops.dps_fast_jit_test.twice(torch.arange(3.0)).tolist(), b.jit_module().answer())
"""


def test_first_import_build_is_shared_and_cached(tmp_path):
    """Two processes start the same build: one compiles, the other waits and loads it;
    a third only loads it from the cache. Each gets the ops and the Python module."""
    root = tmp_path / "csrc"
    (root / "cpu").mkdir(parents=True)
    (root / "ops.cpp").write_text(TINY_OP)
    (root / "module.cpp").write_text(TINY_MODULE)
    code = BUILD_TINY.format(build_py=BUILD_PY, root=str(root))
    env = {**os.environ, "DPS_FAST_CACHE_DIR": str(tmp_path / "cache"), "MAX_JOBS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd="/") for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.strip() == "[0.0, 2.0, 4.0] 42"
    assert sum("compiling" in err for _, err in outs) == 1, [err for _, err in outs]
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                           timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == "[0.0, 2.0, 4.0] 42", again.stderr
    assert "compiling" not in again.stderr
    assert len(glob.glob(str(tmp_path / "cache" / "*" / "built"))) == 1


BROKEN_IMPORT = NO_PREBUILT + """
import json, os, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import dps_fast, torch
    logits, target = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), -1)
    ref = dps_fast.soft_cross_entropy(logits, target, backend="reference")
    auto = dps_fast.soft_cross_entropy(logits, target)  # automatic choice: must not warn again


def refusal(**kwargs):
    try:
        dps_fast.soft_cross_entropy(logits, target, **kwargs)
    except dps_fast.BackendUnavailableError as e:
        return str(e)


explicit = refusal(backend="cpu")
os.environ["DPS_FAST_BACKEND"] = "cpu"
print(json.dumps({
    "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
                 and "dps_fast" in str(w.message)],
    "backends": dps_fast.available_backends(), "explicit": explicit, "from_env": refusal(),
    "same": bool(torch.equal(ref, auto)), "finite": bool(torch.isfinite(ref)),
}))
"""


@pytest.mark.parametrize("cxx, what", [("/bin/false", "the build failed"),
                                       ("/nonexistent/c++", "no C++ compiler")])
def test_broken_compiler_warns_once_and_keeps_the_reference(tmp_path, cxx, what):
    out = _run(BROKEN_IMPORT, env={"CXX": cxx, "DPS_FAST_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["warnings"]) == 1, report["warnings"]
    message = report["warnings"][0]
    assert what in message and "log: " in message and "fix: " in message and "pip install" in message
    assert "prebuilt" not in message  # an absent dps_fast._C is the normal case, not a second failure
    log = message.split("log: ")[1].split(";")[0]
    assert os.path.isfile(log) and cxx in open(log).read()
    assert "cpu" not in report["backends"] and "reference" in report["backends"]
    for refusal in (report["explicit"], report["from_env"]):  # backend="cpu", DPS_FAST_BACKEND=cpu
        assert refusal.startswith("backend 'cpu' is not available: the fused C++ ops could not be built")
        assert what in refusal
    assert report["same"] and report["finite"]


def test_unwritable_cache_warns_and_keeps_the_reference(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = _run(BROKEN_IMPORT, env={"DPS_FAST_CACHE_DIR": str(tmp_path / "file" / "cache")})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["warnings"]) == 1 and "DPS_FAST_CACHE_DIR" in report["warnings"][0], report["warnings"]
    assert "cpu" not in report["backends"] and report["same"] and report["finite"]


def test_cuda_build_settings_and_reasons(tmp_path, monkeypatch):
    """The CUDA half cannot compile here (CPU torch); its settings and skip reasons can be checked."""
    from types import SimpleNamespace

    cuda_torch = SimpleNamespace(version=SimpleNamespace(cuda="13.0"))
    monkeypatch.delenv("DPS_FAST_NO_CUDA", raising=False)
    assert _build.cuda_skip_reason(cuda_torch, "/usr/local/cuda") is None
    assert "nvcc" in _build.cuda_skip_reason(cuda_torch, None)
    assert "CPU-only" in _build.cuda_skip_reason(SimpleNamespace(version=SimpleNamespace(cuda=None)), "/x")
    monkeypatch.setenv("DPS_FAST_NO_CUDA", "1")
    assert "DPS_FAST_NO_CUDA" in _build.cuda_skip_reason(cuda_torch, "/usr/local/cuda")

    monkeypatch.setenv("DPS_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    root = _build.sources_root()
    cpu, cuda = (_build.build_settings(torch, root, cuda=c) for c in (False, True))
    cu = [os.path.relpath(s, root) for s in cuda["sources"]]
    assert "cuda/dps_cross_entropy_glue.cpp" in cu and "cuda/dps_cross_entropy.cu" in cu
    assert "module.cpp" in cu  # the CPython bindings: the JIT build imports its library as dps_fast._C
    assert not [s for s in cpu["sources"] if "cuda" in s]
    assert _build.CUDA_DEFINE in cuda["cflags"] and _build.CUDA_DEFINE not in cpu["cflags"]
    assert cuda["cuda_cflags"] == _build.NVCC_FLAGS and cpu["cuda_cflags"] == []
    if not torch.cuda.is_available():
        assert cuda["arch"] == _build.DEFAULT_CUDA_ARCH_LIST
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _build.build_settings(torch, root, cuda=True)["dir"] != cuda["dir"] != cpu["dir"]

"""How the C++/CUDA ops are compiled: flags and sources shared by setup.py and the
first-import (just-in-time) build.

Two ways to get the ops (README "Install"):
  * ``pip install --no-build-isolation .`` compiles them at install time into the
    Python module ``dps_fast._C`` (setup.py, with the flags below);
  * a plain ``pip install .`` builds in an isolated environment without torch, so it
    installs the sources (``dps_fast/csrc``) instead; the first ``import dps_fast``
    then compiles them once with ninja (``torch.utils.cpp_extension.load``) into a
    cache directory keyed by the torch version, the sources, the flags and the
    compiler, and loads the shared library with ``torch.ops.load_library``.

setup.py loads this file by path, before torch may be importable: keep the module
level free of torch and of package-relative imports.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import platform
import re
import shutil
import sys
import time
import warnings

# Compile flags, in one place (setup.py and the JIT build). AVX2 on x86-64 is the
# at::vec AVX2 path; never -march=native (a wheel, or a cache on a shared home, runs
# on other machines) nor -ffast-math (the kernels use -inf and NaN, which it assumes away).
BASE_CXX_FLAGS = ["-O3", "-g0", "-std=c++17", "-fopenmp", "-DNDEBUG"]
X86_CXX_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
LINK_FLAGS = ["-fopenmp", "-g0"]
NVCC_FLAGS = ["-O3", "-g0", "-std=c++17", "--use_fast_math", "-lineinfo"]
CUDA_DEFINE = "-DDPS_FAST_WITH_CUDA"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0;10.0+PTX"
LIBRARY_NAME = "dps_fast_ops"
_HASHED_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def cxx_flags(machine: str | None = None) -> list[str]:
    machine = (machine or platform.machine()).lower()
    return BASE_CXX_FLAGS + (X86_CXX_FLAGS if machine in ("x86_64", "amd64") else [])


def source_files(root: str, cuda: bool, python_module: bool) -> list[str]:
    """The translation units under ``root`` (the csrc folder), in a stable order.

    ``module.cpp`` makes the library importable as a Python module (``dps_fast._C``) with
    the CPython bindings of the eager ops; the JIT build takes it too where ``root`` has it,
    and imports the library it built under that name (:func:`jit_module`).
    """
    names = [n for n in _glob(root, "*.cpp") if n != "module.cpp"] + (["module.cpp"] if python_module else [])
    names += _glob(root, "cpu/*.cpp")
    if cuda:
        names += _glob(root, "cuda/*.cpp") + _glob(root, "cuda/*.cu")
    return [os.path.join(root, n) for n in names]


def _glob(root: str, pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, pattern)))


def cuda_skip_reason(torch, cuda_home: str | None) -> str | None:
    """None when the CUDA kernels should be compiled, else why they are not."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    if os.environ.get("DPS_FAST_NO_CUDA", "0") == "1":
        return "DPS_FAST_NO_CUDA=1 is set"
    if cuda_home is None:
        return "nvcc was not found (install the CUDA toolkit or set CUDA_HOME)"
    return None


# ---------------------------------------------------------------- JIT build


class BuildError(RuntimeError):
    """The ops could not be compiled; the message is the actionable summary."""


_notes: dict = {}  # what the JIT build did, for _dispatch's messages


def cuda_note() -> str | None:
    """Why the JIT-built library has no CUDA kernels (None if it has, or if not JIT-built)."""
    return _notes.get("cuda")


def sources_root() -> str | None:
    """The csrc folder: installed as dps_fast/csrc, or beside the package in a checkout
    (source tree or editable install)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.isfile(os.path.join(root, "ops.cpp")):
            return root
    return None


def cache_root() -> str:
    """DPS_FAST_CACHE_DIR, else $XDG_CACHE_HOME/dps_fast, else ~/.cache/dps_fast."""
    explicit = os.environ.get("DPS_FAST_CACHE_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dps_fast")


def _compiler() -> str | None:
    found = shutil.which(os.environ.get("CXX") or "c++")
    return os.path.realpath(found) if found else None


def _ninja_dirs() -> list[str]:
    """Where the ninja binary may live when the venv is not activated (PATH lacks its bin)."""
    dirs = []
    with contextlib.suppress(Exception):
        import ninja  # the PyPI package (a runtime requirement) ships the binary

        dirs.append(ninja.BIN_DIR)
    dirs.append(os.path.dirname(sys.executable))
    return dirs


@contextlib.contextmanager
def _ninja_on_path():
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join(_ninja_dirs() + [old])
    try:
        yield shutil.which("ninja")
    finally:
        os.environ["PATH"] = old


def build_settings(torch, root: str, cuda: bool) -> dict:
    """Everything that decides the binary; its hash names the cache folder."""
    settings = {
        "sources": source_files(root, cuda, python_module=os.path.isfile(os.path.join(root, "module.cpp"))),
        "cflags": cxx_flags() + ([CUDA_DEFINE] if cuda else []),
        "ldflags": list(LINK_FLAGS),
        "cuda_cflags": list(NVCC_FLAGS) if cuda else [],
        "arch": (os.environ.get("TORCH_CUDA_ARCH_LIST") or _visible_arch_list(torch)) if cuda else "",
    }
    h = hashlib.sha256()
    h.update(repr([os.path.relpath(p, root) for p in settings["sources"]]).encode())
    for key in ("cflags", "ldflags", "cuda_cflags", "arch"):
        h.update(repr(settings[key]).encode())
    h.update(repr((torch.__version__, torch.version.cuda, sys.implementation.cache_tag,
                   platform.machine(), _compiler())).encode())
    for path in sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                       if p.endswith(_HASHED_SUFFIXES) and os.sep + "test" + os.sep not in p):
        h.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    tag = re.sub(r"[^A-Za-z0-9.]+", "_", f"torch{torch.__version__}-{sys.implementation.cache_tag}")
    settings["dir"] = os.path.join(cache_root(), f"{tag}-{'cuda' if cuda else 'cpu'}-{h.hexdigest()[:16]}")
    return settings


def _visible_arch_list(torch) -> str:
    """The GPUs of this machine (+PTX of the newest), else the wheel build's default list."""
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps) + "+PTX"
    return DEFAULT_CUDA_ARCH_LIST


def load_jit() -> str | None:
    """Compile the ops once (cached) and load them: None on success, else why not.

    A CUDA build that fails falls back to the CPU-only ops and warns once; the reason
    stays in cuda_note() for the 'cuda' backend's error.
    """
    import torch
    from torch.utils import cpp_extension

    root = sources_root()
    if root is None:
        return ("the C++ extension dps_fast._C is not built and its sources (dps_fast/csrc) are not "
                "installed: reinstall with `pip install .`")
    _notes["cuda"] = cuda_skip_reason(torch, cpp_extension.CUDA_HOME)
    try:
        if _notes["cuda"] is None:
            try:
                _build_and_load(torch, root, cuda=True)
                return None
            except BuildError as e:
                _notes["cuda"] = f"the CUDA kernels did not compile ({e})"
                warnings.warn(f"dps_fast: {_notes['cuda']}; building the CPU ops alone", RuntimeWarning,
                              stacklevel=2)
        _build_and_load(torch, root, cuda=False)
        return None
    except BuildError as e:
        return f"the fused C++ ops could not be built: {e}"
    except OSError as e:  # e.g. a read-only home directory
        return (f"the fused C++ ops could not be built: {type(e).__name__}: {e} (set DPS_FAST_CACHE_DIR to "
                f"a writable folder, or compile at install time with `pip install --no-build-isolation .`)")


def jit_module():
    """The library of the first-import build imported as the module ``dps_fast._C`` (its
    CPython bindings, csrc/module.cpp), or None (not built here, or its sources lack them)."""
    return _notes.get("module")


def _build_and_load(torch, root: str, cuda: bool) -> None:
    settings = build_settings(torch, root, cuda)
    _load_or_build(torch, settings)
    if os.path.join(root, "module.cpp") in settings["sources"]:
        _notes["module"] = _import_as_module(os.path.join(settings["dir"], LIBRARY_NAME + ".so"))


def _load_or_build(torch, settings: dict) -> None:
    folder = settings["dir"]
    built, library = os.path.join(folder, "built"), os.path.join(folder, LIBRARY_NAME + ".so")
    if os.path.exists(built):
        try:
            torch.ops.load_library(library)
            return
        except OSError:  # a damaged cache (library removed or truncated): build again
            with contextlib.suppress(FileNotFoundError):
                os.remove(built)
    os.makedirs(folder, exist_ok=True)
    # One build per key across processes (DDP ranks import together); flock is
    # released by the kernel if its holder dies, unlike torch's own lock file.
    with _locked(folder + ".lock") as waiting_since:
        if os.path.exists(built):  # built by another process while this one waited
            torch.ops.load_library(library)
            return
        _raise_if_failed_meanwhile(folder, waiting_since)
        _compile(settings)  # torch's load() also loads the library
        open(built, "w").close()


def _import_as_module(library: str):
    """The loaded library as a Python module: its init function is PyInit__C, so the name
    must end in ``_C``. The ops are registered already (the library is loaded); a module
    that does not import only costs the bindings, and torch.ops serves instead."""
    import importlib.util

    try:
        spec = importlib.util.spec_from_file_location("dps_fast._C", library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except (ImportError, OSError):
        return None


@contextlib.contextmanager
def _locked(path: str):
    since = time.time()
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield since
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield since
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _raise_if_failed_meanwhile(folder: str, waiting_since: float) -> None:
    """A build that failed while this process waited for the lock is not retried (the
    other ranks of a job would each repeat it); a later import retries."""
    failed = os.path.join(folder, "failed")
    if os.path.exists(failed):
        if os.path.getmtime(failed) >= waiting_since:
            with open(failed) as f:
                raise BuildError(f.read())
        os.remove(failed)


def _compile(settings: dict) -> None:
    from torch.utils import cpp_extension

    folder = settings["dir"]
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, "lock"))  # torch's lock file, stale if a build was killed
    log = os.path.join(folder, "build.log")
    cuda = bool(settings["cuda_cflags"])
    with _ninja_on_path() as ninja, _env("TORCH_CUDA_ARCH_LIST", settings["arch"] or None), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problem, details = _preflight(_compiler(), ninja), ""
        if problem is None:
            start = time.time()
            print(f"dps_fast: compiling the {'CUDA and C++' if cuda else 'C++'} ops once for this torch "
                  f"(a few minutes) into {folder} ...", end="", file=sys.stderr, flush=True)
            try:
                cpp_extension.load(LIBRARY_NAME, settings["sources"], extra_cflags=settings["cflags"],
                                   extra_ldflags=settings["ldflags"], extra_cuda_cflags=settings["cuda_cflags"],
                                   build_directory=folder, with_cuda=cuda, is_python_module=False,
                                   verbose=False)
                print(f" done in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 - any failure falls back to the reference backend
                print(" failed", file=sys.stderr, flush=True)
                problem, details = _summary(str(e)), f"{type(e).__name__}: {e}"
    _write_log(log, settings, ninja, caught, details or problem or "ok")
    if problem is not None:
        message = f"{problem}; log: {log}; fix: {_FIX}"
        with open(os.path.join(folder, "failed"), "w") as f:
            f.write(message)
        raise BuildError(message)


_FIX = ("install a C++17 compiler (g++ or clang++; CXX selects it) and ninja (`pip install ninja`), then "
        "import dps_fast again; or compile at install time with `pip install --no-build-isolation .`")


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _preflight(cxx: str | None, ninja: str | None) -> str | None:
    if cxx is None:
        return f"no C++ compiler: `{os.environ.get('CXX') or 'c++'}` is not on PATH"
    if ninja is None:
        return "ninja is not installed"
    return None


def _summary(output: str) -> str:
    """The first compiler error of a failed build, else its first failed command."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for pattern in (r"\berror\b", r"^FAILED:", r"."):
        hits = [ln for ln in lines if re.search(pattern, ln) and not ln.startswith("Error building extension")]
        if hits:
            return "the build failed: " + (hits[0][:300].rstrip(".") + (" ..." if len(hits[0]) > 300 else ""))
    return "the build failed"


def _write_log(path: str, settings: dict, ninja: str | None, caught, details: str) -> None:
    import torch

    lines = [f"dps_fast JIT build, {time.strftime('%Y-%m-%d %H:%M:%S')}",
             f"torch {torch.__version__} (cuda {torch.version.cuda}), python {sys.version.split()[0]}",
             f"compiler {_compiler()} (CXX={os.environ.get('CXX')}), ninja {ninja}",
             *(f"{k}: {settings[k]}" for k in ("sources", "cflags", "ldflags", "cuda_cflags", "arch")),
             *(f"warning: {w.message}" for w in caught), "", details]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")

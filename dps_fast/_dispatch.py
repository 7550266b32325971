"""Backend selection: public API -> dispatch -> backend.

Backends:
  reference  plain PyTorch (:mod:`dps_fast.reference`), any device and dtype;
  cpu        fused C++ kernels of the extension ``dps_fast._C`` (``torch.ops.dps_fast``);
  cuda       fused CUDA C++ kernels of the same extension, when built against CUDA torch;
  triton     fused Triton kernels (``torch.ops.dps_fast_triton``), on CUDA tensors, or on
             CPU tensors under ``TRITON_INTERPRET=1`` (for testing).

``backend=None`` (or ``"auto"``) picks the fastest available backend for the
tensors' device and dtype, else the reference. The environment variable
``DPS_FAST_BACKEND`` sets the default. Asking explicitly for a backend that is not
available raises :class:`BackendUnavailableError`; the automatic choice never
fails over to anything but the (exact) reference, and says so once.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings

import torch

from . import _build
from ._validate import FUSED_DTYPES

BACKENDS = ("reference", "cpu", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """The requested backend is not available for these tensors on this machine."""


_state: dict = {}
_eager_bindings: dict = {}  # op name -> dps_fast._C function (_bindings_of)


def _cpu_ext() -> str | None:
    """None if the C++ ops are loaded, else why not.

    The prebuilt module dps_fast._C (``pip install --no-build-isolation .``) if present,
    else the ops compiled on first import (:mod:`dps_fast._build`). A failure warns once,
    here, with the same text the automatic backend choice would print.
    """
    if "cpu" not in _state:
        prebuilt = _import_prebuilt()
        _state["cpu"] = None if prebuilt is None else _build.load_jit()
        if _state["cpu"] is not None and prebuilt != "absent":
            _state["cpu"] += f" (the prebuilt dps_fast._C did not load either: {prebuilt})"
        if _state["cpu"] is not None:
            _warn_once(f"dps_fast: using the reference backend on CPU because {_state['cpu']}")
        else:
            module = sys.modules.get(f"{__package__}._C") if prebuilt is None else _build.jit_module()
            _eager_bindings.update(_bindings_of(module))
    return _state["cpu"]


def _import_prebuilt() -> str | None:
    """None if dps_fast._C imported, "absent" if it is not installed, else the error."""
    try:  # import_module, not `from . import _C`: that would hide a missing module as a plain ImportError
        importlib.import_module(f"{__package__}._C")
        return None
    except ModuleNotFoundError as e:
        if e.name == f"{__package__}._C":
            return "absent"
        return f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - e.g. built against another torch
        return f"{type(e).__name__}: {e}"


def _cuda_ext() -> str | None:
    if "cuda" not in _state:
        why = _cpu_ext()
        if why is None and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "dps_fast::dps_ce_fwd", "CUDA"
        ):
            why = "the C++ ops were built without CUDA kernels: " + (
                _build.cuda_note() or "build against a CUDA torch with nvcc")
        _state["cuda"] = why
    return _state["cuda"]


def _triton() -> str | None:
    if "triton" not in _state:
        if _cpu_ext() is not None:  # the Triton ops copy their schemas from the C++ extension
            _state["triton"] = f"the Triton kernels need the C++ extension's op schemas, and {_cpu_ext()}"
            return _state["triton"]
        try:
            from . import kernels  # noqa: F401  (registers torch.ops.dps_fast_triton)

            _state["triton"] = None
        except Exception as e:  # pragma: no cover - depends on the install
            _state["triton"] = f"the Triton kernels did not import ({type(e).__name__}: {e})"
    return _state["triton"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(name: str, device: torch.device | str = "cpu") -> bool:
    try:
        resolve(name, torch.device(device), (torch.float32,))
        return True
    except (BackendUnavailableError, ValueError, TypeError):
        return False


def _warn_once(msg: str) -> None:
    if not _state.get(("warned", msg)):
        _state[("warned", msg)] = True
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


_resolved: dict = {}


def resolve(backend, device: torch.device, dtypes) -> str:
    """The backend to run on: ``backend`` or the automatic choice, checked for the device and
    dtypes (errors as described at the top). Successful answers are cached per arguments."""
    # the environment only matters when no backend is named (reading it costs ~4 us a call)
    env = os.environ.get("DPS_FAST_BACKEND") if backend is None else None
    key = (backend, env, device, tuple(dtypes))
    name = _resolved.get(key)
    if name is None:
        name = _resolved[key] = _resolve(backend, device, dtypes)
    return name


def _resolve(backend, device: torch.device, dtypes) -> str:
    name = backend if backend is not None else os.environ.get("DPS_FAST_BACKEND") or "auto"
    fused_ok = all(dt in FUSED_DTYPES for dt in dtypes)
    if name == "auto":
        if not fused_ok:
            return "reference"
        if device.type == "cpu":
            why = _cpu_ext()
            if why is None:
                return "cpu"
            _warn_once(f"dps_fast: using the reference backend on CPU because {why}")
            return "reference"
        if device.type == "cuda":
            if _triton() is None:
                return "triton"
            if _cuda_ext() is None:
                return "cuda"
            _warn_once("dps_fast: using the reference backend on CUDA: neither Triton nor the "
                       "CUDA extension is available")
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} or None for automatic")
    if name == "reference":
        return name
    if not fused_ok:
        bad = [dt for dt in dtypes if dt not in FUSED_DTYPES][0]
        raise TypeError(
            f"backend {name!r} takes float32, bfloat16 or float16 tensors, got {bad}; "
            f"use backend='reference' for other dtypes"
        )
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
        why = _cpu_ext()
    elif name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}")
        why = _cuda_ext()
    else:  # triton
        why = _triton()
        if why is None and device.type == "cpu" and not _interpreting():
            why = "Triton runs on CPU tensors only in its interpreter (set TRITON_INTERPRET=1 before import)"
        elif why is None and device.type not in ("cpu", "cuda"):
            why = f"Triton does not run on {device.type} tensors"
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {why}")
    return name


def ops(name: str):
    """The op namespace of a fused backend."""
    if name == "triton":
        return torch.ops.dps_fast_triton
    return torch.ops.dps_fast


_overloads: dict = {}


def op(name: str, op_name: str):
    """The op ``op_name`` of a fused backend, as its single overload: calling the overload
    skips the packet's overload resolution (16 us instead of 22 us per DPS-step call at
    [128, 10] on the 2-core VM, 2026-11-30)."""
    key = (name, op_name)
    found = _overloads.get(key)
    if found is None:
        found = getattr(ops(name), op_name).default
        if not torch.compiler.is_compiling():  # no global-dict writes inside a traced region
            _overloads[key] = found
    return found


_EAGER_BACKENDS = (None, "auto", "cpu")
# How an eager op's NotImplementedError starts when it declines a call (csrc/fast_path.cpp)
EAGER_DECLINES = "dps_fast: the eager fast path declines"


def eager_op(op_name: str, x, backend):
    """The C++ op ``op_name`` that runs a whole public call on CPU tensors (the eager fast
    path, docs/contributing.md), or None where the call takes the Python path: the C++ ops
    are not loaded, ``x`` is not a CPU tensor, another backend is named, the call is traced
    (torch.compile), transformed (torch.func) or re-run inside backward (activation
    checkpointing), compiled autograd is on, or a torch function/dispatch mode is active. The op itself declines
    whatever else it does not take on (:data:`EAGER_DECLINES`)."""
    if backend not in _EAGER_BACKENDS or not isinstance(x, torch.Tensor) or not x.is_cpu:
        return None
    if torch.compiler.is_compiling() or torch._C._current_graph_task_id() != -1 or \
            torch._C._functorch.is_functorch_wrapped_tensor(x):
        return None
    # a torch function mode would see the eager op in place of the Python path's calls
    # (the op declines under a dispatch mode itself)
    if torch._C._is_torch_function_mode_enabled():
        return None
    # the fast path's autograd node cannot be traced by compiled autograd (csrc/ops.cpp)
    compiled_autograd = sys.modules.get("torch._dynamo.compiled_autograd")
    if compiled_autograd is not None and compiled_autograd.compiled_autograd_enabled:
        return None
    if _state.get("cpu", "not loaded") is not None:
        return None
    found = _eager_bindings.get(op_name)
    return found if found is not None else op("cpu", op_name)


def _bindings_of(module) -> dict:
    """The eager ops that ``module`` (dps_fast._C, prebuilt or first-import built) binds as
    plain CPython functions (csrc/module.cpp): the same ops, called without torch.ops' boxed
    argument parsing (~7 of a ~22 us forward at [128, 10]). ``make sanitize`` loads a stub
    module: there, none, and torch.ops serves."""
    return {name: getattr(module, name) for name in ("dps_ce_eager",) if hasattr(module, name)}

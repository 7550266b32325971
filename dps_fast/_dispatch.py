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

What each backend takes and the automatic order per device are data
(:data:`TABLE`, :data:`AUTO`); the extension itself is loaded by :mod:`dps_fast._extension`.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, NamedTuple

import torch

from . import _build, _extension
from ._validate import FUSED_DTYPES


class BackendUnavailableError(RuntimeError):
    """The requested backend is not available for these tensors on this machine."""


_state: dict = {}  # the Triton and CUDA probes' answers, and the warnings already given


# The fused ops with a CUDA kernel (csrc/cuda/*_glue.cpp's TORCH_LIBRARY_IMPL; scale_unless_one_
# has a generic kernel besides): every one is checked, so that a build missing one reports it
# here, not as a dispatcher error in the middle of a step.
CUDA_OPS = ("dps_ce_fwd", "soft_ce_fwd", "supcon_lse", "supcon_grad", "topk_step")


def _cuda_probe(device: torch.device) -> str | None:
    if "cuda" not in _state:
        why = _extension.load_error
        missing = [op for op in CUDA_OPS
                   if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dps_fast::{op}", "CUDA")]
        if why is None and len(missing) == len(CUDA_OPS):
            why = "the C++ ops were built without CUDA kernels: " + (
                _build.cuda_note() or "build against a CUDA torch with nvcc")
        elif why is None and missing:
            why = f"the C++ ops were built without the CUDA kernels of {', '.join(missing)}: rebuild them"
        _state["cuda"] = why
    return _state["cuda"]


def _triton_imported() -> str | None:
    if "triton" not in _state:
        if _extension.load_error is not None:  # the Triton ops copy their schemas from the C++ extension
            _state["triton"] = f"the Triton kernels need the C++ extension's op schemas, and {_extension.load_error}"
            return _state["triton"]
        try:
            # Deferred, the one import here that is: Triton is optional and slow to import, and
            # dps_fast.kernels registers its ops from the op modules, which dispatch through
            # this module (tests/test_structure.py allows this one edge of the import graph).
            from . import kernels  # noqa: F401  (registers torch.ops.dps_fast_triton)

            _state["triton"] = None
        except Exception as e:  # pragma: no cover - depends on the install
            _state["triton"] = f"the Triton kernels did not import ({type(e).__name__}: {e})"
    return _state["triton"]


def _triton_probe(device: torch.device) -> str | None:
    why = _triton_imported()
    if why is None and device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        why = "Triton runs on CPU tensors only in its interpreter (set TRITON_INTERPRET=1 before import)"
    elif why is None and device.type not in ("cpu", "cuda"):
        why = f"Triton does not run on {device.type} tensors"
    return why


class Backend(NamedTuple):
    name: str
    device: str | None  # the one device type it takes (ValueError on others); None: its probe says
    dtypes: tuple | None  # the tensor dtypes it takes (TypeError on others); None: any
    probe: Callable[[torch.device], str | None]  # None where it runs on this machine, else why not


# Every backend, in the order available_backends() lists them.
TABLE = (
    Backend("reference", None, None, lambda device: None),
    Backend("cpu", "cpu", FUSED_DTYPES, lambda device: _extension.load_error),
    Backend("triton", None, FUSED_DTYPES, _triton_probe),
    Backend("cuda", "cuda", FUSED_DTYPES, _cuda_probe),
)
BACKENDS = tuple(b.name for b in TABLE)
_BY_NAME = {b.name: b for b in TABLE}
# The automatic choice: the first of these that takes the dtypes and runs here, else the
# reference, with this warning (once) when one took the dtypes but did not run. Other
# device types always take the reference.
AUTO = {
    "cpu": (("cpu",), "dps_fast: using the reference backend on CPU because {why}"),
    "cuda": (("triton", "cuda"), "dps_fast: using the reference backend on CUDA: neither Triton nor the "
                                 "CUDA extension is available"),
}


def _warn_once(msg: str, stacklevel: int = 4) -> None:
    if not _state.get(("warned", msg)):
        _state[("warned", msg)] = True
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)


if _extension.load_error is not None:  # said at import, once: the automatic choice on CPU says no more
    _warn_once(AUTO["cpu"][1].format(why=_extension.load_error))


def backend_name(backend):
    """``backend`` if it names a backend, None or "auto"; else ValueError."""
    if backend is not None and backend != "auto" and backend not in _BY_NAME:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or None for automatic")
    return backend


def available(name: str, device: torch.device | str = "cpu") -> bool:
    try:
        resolve(name, torch.device(device), (torch.float32,))
        return True
    except (BackendUnavailableError, ValueError, TypeError):
        return False


def available_backends(device="cpu") -> list[str]:
    """Backends usable for float32 tensors on ``device``."""
    return [b for b in BACKENDS if available(b, device)]


_resolved: dict = {}


def resolve(backend, device: torch.device, dtypes) -> str:
    """The backend to run on: ``backend`` or the automatic choice, checked for the device and
    dtypes (errors as described at the top). Successful answers are cached per arguments."""
    # the environment only matters when no backend is named (reading it costs ~4 us a call)
    env = os.environ.get("DPS_FAST_BACKEND") if backend is None else None
    key = (backend, env, device, tuple(dtypes))
    name = _resolved.get(key)
    if name is None:
        name = _resolved[key] = _resolve(backend_name(backend if backend is not None else env or "auto"),
                                         device, dtypes)
    return name


def _resolve(name: str, device: torch.device, dtypes) -> str:
    """The checked choice for a known backend name or "auto" (a row of :data:`TABLE`)."""
    if name == "auto":
        return _auto(device, dtypes)
    row = _BY_NAME[name]
    bad = [dt for dt in dtypes if not _takes(row, (dt,))]
    if bad:
        raise TypeError(f"backend {name!r} takes {_dtype_names(row.dtypes)} tensors, got {bad[0]}; "
                        f"use backend='reference' for other dtypes")
    if row.device is not None and device.type != row.device:
        raise ValueError(f"backend {name!r} needs {row.device.upper()} tensors, got tensors on {device}")
    why = row.probe(device)
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {why}")
    return name


def _auto(device: torch.device, dtypes) -> str:
    order, fallback_warning = AUTO.get(device.type, ((), ""))
    whys = []
    for row in (_BY_NAME[n] for n in order if _takes(_BY_NAME[n], dtypes)):
        whys.append(row.probe(device))
        if whys[-1] is None:
            return row.name
    if whys:
        _warn_once(fallback_warning.format(why=whys[0]), stacklevel=5)  # the caller of resolve()
    return "reference"


def _takes(row: Backend, dtypes) -> bool:
    return row.dtypes is None or all(dt in row.dtypes for dt in dtypes)


def _dtype_names(dtypes) -> str:
    """"float32, bfloat16 or float16": the names of ``dtypes``, as the errors say them."""
    names = [str(dt).removeprefix("torch.") for dt in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def namespace(name: str):
    """The torch.ops namespace of a fused backend's kernel ops (``torch.ops.dps_fast`` or
    ``torch.ops.dps_fast_triton``)."""
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
        found = getattr(namespace(name), op_name).default
        if not torch.compiler.is_compiling():  # no global-dict writes inside a traced region
            _overloads[key] = found
    return found

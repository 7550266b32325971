"""The C++ extension ``dps_fast._C`` (the op schemas, the CPU and CUDA kernels, the eager fast
path), loaded once, when this module is first imported; nothing else loads it.

The prebuilt module (``pip install --no-build-isolation .``) if it imports, else the ops
compiled on first import (:mod:`dps_fast._build`). What the rest of the package reads:

- :data:`load_error`: None when the C++ ops are loaded, else why not (the reason the
  automatic backend choice gives, :mod:`dps_fast._dispatch`);
- :data:`eager_bindings`: op name -> the plain CPython function of the eager op
  (csrc/module.cpp), for the eager fast path;
- :data:`check_index`: the C++ index check ``dps_fast::check_index`` (the twin of
  :func:`dps_fast._validate.index_values`), or None.
"""
from __future__ import annotations

import importlib
import sys

import torch

from . import _build
from . import _contract as contract

_NAME = f"{__package__}._C"


def _import_prebuilt() -> str | None:
    """None if dps_fast._C imported, "absent" if it is not installed, else the error."""
    try:  # import_module, not `from . import _C`: that would hide a missing module as a plain ImportError
        importlib.import_module(_NAME)
        return None
    except ModuleNotFoundError as e:
        if e.name == _NAME:
            return "absent"
        return f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - e.g. built against another torch
        return f"{type(e).__name__}: {e}"


def _load() -> tuple[str | None, object]:
    """(None, the loaded module) or (why the C++ ops are not loaded, None)."""
    prebuilt = _import_prebuilt()
    if prebuilt is None:
        return None, sys.modules.get(_NAME)
    why = _build.load_jit()
    if why is None:
        return None, _build.jit_module()
    if prebuilt != "absent":  # an absent dps_fast._C is the normal case, not a second failure
        why += f" (the prebuilt dps_fast._C did not load either: {prebuilt})"
    return why, None


def _bindings_of(module) -> dict:
    """The eager ops that ``module`` (dps_fast._C, prebuilt or first-import built) binds as
    plain CPython functions (csrc/module.cpp): the same ops, called without torch.ops' boxed
    argument parsing (~7 of a ~22 us forward at [128, 10]). ``make sanitize`` loads a stub
    module: there, none, and torch.ops serves."""
    return {name: getattr(module, name) for name in (contract.EAGER_OP,) if hasattr(module, name)}


load_error, _module = _load()
eager_bindings: dict = {} if load_error is not None else _bindings_of(_module)
check_index = torch.ops.dps_fast.check_index.default if load_error is None else None

"""Triton kernels of dps_fast (installed as ``dps_fast.kernels``).

Importing this package registers ``torch.ops.dps_fast_triton.<op>`` for every fused op of
:mod:`dps_fast.ops`, with the schema the C++ extension defines, for CUDA tensors, and for
CPU tensors when Triton runs in its interpreter (``TRITON_INTERPRET=1`` set before import;
that is how the kernels are tested on machines without a GPU). A kernel module here
provides an op by defining a function named like it (``dps_ce_fwd``, ...); modules are
found by name, so adding ``dps_fast/kernels/<op>.py`` is all a new op needs here.
"""
import importlib
import os
import pkgutil

import torch

from .. import _registration

_KEYS = ["CUDA"] + (["CPU"] if os.environ.get("TRITON_INTERPRET", "0") == "1" else [])
_MODULES = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)
            if not m.name.startswith("_")]


def _impl(op: str):
    found = [getattr(m, op) for m in _MODULES if callable(getattr(m, op, None))]
    if len(found) != 1:
        raise ImportError(f"dps_fast.kernels: expected one Triton implementation of {op}, found {len(found)}")
    return found[0]


_lib = torch.library.Library("dps_fast_triton", "DEF")
# the declared kernel ops, and the top-k bank's step (eager only: dps_fast/topk.py calls it)
for _name in [kernel.name for kernel in _registration.kernels()] + ["topk_step"]:
    _lib.define(_registration.schema(_name))
    for _key in _KEYS:
        _lib.impl(_name, _impl(_name), _key)
_registration.register_fakes("dps_fast_triton")

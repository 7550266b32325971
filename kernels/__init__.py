"""Triton kernels of dps_fast (installed as ``dps_fast.kernels``).

Importing this package registers ``torch.ops.dps_fast_triton.{dps_ce_fwd,
soft_ce_fwd, supcon_fwd}`` with the same schemas as the C++ ops
(``dps_fast._ops.SCHEMAS``), for CUDA tensors, and for CPU tensors when Triton
runs in its interpreter (``TRITON_INTERPRET=1`` set before import; that is how the
kernels are tested on machines without a GPU).
"""
import os

import torch

from .. import _ops
from . import dps_cross_entropy as _dce
from . import supcon as _sc

_lib = torch.library.Library("dps_fast_triton", "DEF")
_KEYS = ["CUDA"] + (["CPU"] if os.environ.get("TRITON_INTERPRET", "0") == "1" else [])
for _name, _fn in (("dps_ce_fwd", _dce.dps_ce_fwd), ("soft_ce_fwd", _dce.soft_ce_fwd),
                   ("supcon_fwd", _sc.supcon_fwd)):
    _lib.define(_ops.SCHEMAS[_name])
    for _key in _KEYS:
        _lib.impl(_name, _fn, _key)
_ops.register_fakes("dps_fast_triton")

"""dps_fast: Deep Probabilistic Supervision with fused kernels.

Public API (see README.md and docs/method.md):
  init_prior, dps_cross_entropy, soft_cross_entropy, supcon_loss, posterior_readouts,
  DPSLoss, metrics, BackendUnavailableError, available_backends.
"""
from __future__ import annotations

import torch as _torch

from . import _dispatch

_dispatch._cpu_ext()  # load dps_fast._C (the op schemas) before the Python fragments

from . import _ops  # noqa: E402
from . import metrics  # noqa: E402
from ._dispatch import BackendUnavailableError  # noqa: E402
from .functional import (  # noqa: E402
    dps_cross_entropy,
    init_prior,
    posterior_readouts,
    soft_cross_entropy,
    supcon_loss,
)
from .loss import DPSLoss  # noqa: E402

if _dispatch._cpu_ext() is None:
    _ops.register_fakes("dps_fast")
    from . import _validate

    _validate._fast_check = _torch.ops.dps_fast.check_index.default

__version__ = "0.1.0"


def available_backends(device="cpu") -> list[str]:
    """Backends usable for float32 tensors on ``device``."""
    return [b for b in _dispatch.BACKENDS if _dispatch.available(b, device)]


__all__ = [
    "init_prior", "dps_cross_entropy", "soft_cross_entropy", "supcon_loss", "posterior_readouts",
    "DPSLoss", "metrics", "BackendUnavailableError", "available_backends",
]

"""dps_fast: Deep Probabilistic Supervision with fused kernels.

Public API (README.md; the maths in docs/method.md): init_prior, dps_cross_entropy,
soft_cross_entropy, supcon_loss, posterior_readouts, DPSLoss, HostDPSLoss, metrics,
BackendUnavailableError, available_backends; dps_fast.distributed for DDP.
"""
from __future__ import annotations

import torch as _torch

from . import _dispatch

_dispatch._cpu_ext()  # load dps_fast._C (the op schemas) before the Python fragments

from . import _ops  # noqa: E402
from . import metrics  # noqa: E402
from ._dispatch import BackendUnavailableError  # noqa: E402
from .functional import init_prior, posterior_readouts  # noqa: E402
from .datasets import WithIndex  # noqa: E402
from .loss import DPSLoss, HostDPSLoss  # noqa: E402
from . import calibration, label_issues, soft_labels  # noqa: E402
from .label_issues import LabelIssues, estimate_noise_rate, find_label_issues, label_issue_scores  # noqa: E402
from .soft_labels import SoftLabels, export_soft_labels, load_soft_labels  # noqa: E402
from .ops import PUBLIC as _PUBLIC  # noqa: E402

globals().update(_PUBLIC)  # dps_cross_entropy, soft_cross_entropy, supcon_loss, ...

if _dispatch._cpu_ext() is None:
    _ops.register_fakes("dps_fast")
    _ops.register_check_index()
    from . import _validate

    _validate._fast_check = _torch.ops.dps_fast.check_index.default

__version__ = "0.1.0"


def available_backends(device="cpu") -> list[str]:
    """Backends usable for float32 tensors on ``device``."""
    return [b for b in _dispatch.BACKENDS if _dispatch.available(b, device)]


from . import distributed  # noqa: E402  (after DPSLoss: DistributedDPSLoss builds on it)

__all__ = ["init_prior", "posterior_readouts", "DPSLoss", "HostDPSLoss", "WithIndex", "metrics", "distributed",
           "BackendUnavailableError", "available_backends", "label_issues", "soft_labels", "find_label_issues",
           "label_issue_scores", "estimate_noise_rate", "LabelIssues", "export_soft_labels", "load_soft_labels",
           "SoftLabels", "calibration"] + sorted(_PUBLIC)

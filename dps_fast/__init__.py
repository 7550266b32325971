"""dps_fast: Deep Probabilistic Supervision with fused kernels.

Public API (README.md; the maths in docs/method.md): init_prior, dps_cross_entropy,
soft_cross_entropy, supcon_loss, posterior_readouts, DPSLoss, HostDPSLoss, metrics,
BackendUnavailableError, available_backends; dps_fast.distributed for DDP.
"""
from __future__ import annotations

# First: loads the C++ extension (dps_fast._extension), warns once if it did not load.
from ._dispatch import BackendUnavailableError, available_backends
from . import _registration  # noqa: F401  (registers the C++ ops' fake kernels, for torch.compile)
from . import calibration, distributed, label_issues, metrics, soft_labels
from . import reference  # noqa: F401  (dps_fast.reference, the oracle; not in __all__, as before)
from .datasets import WithIndex
from .functional import init_prior, posterior_readouts
from .label_issues import LabelIssues, estimate_noise_rate, find_label_issues, label_issue_scores
from .loss import DPSLoss, HostDPSLoss
from .ops.dps_cross_entropy import dps_cross_entropy
from .ops.soft_cross_entropy import soft_cross_entropy
from .ops.supcon import supcon_loss
from .soft_labels import SoftLabels, export_soft_labels, load_soft_labels

__version__ = "0.1.0"

__all__ = ["init_prior", "posterior_readouts", "DPSLoss", "HostDPSLoss", "WithIndex", "metrics", "distributed",
           "BackendUnavailableError", "available_backends", "label_issues", "soft_labels", "find_label_issues",
           "label_issue_scores", "estimate_noise_rate", "LabelIssues", "export_soft_labels", "load_soft_labels",
           "SoftLabels", "calibration", "dps_cross_entropy", "soft_cross_entropy", "supcon_loss"]

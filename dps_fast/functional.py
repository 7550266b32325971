"""Public functional API: validate -> dispatch -> backend.

The fused ops live one per module in :mod:`dps_fast.ops`; this module gathers their
public functions with the bank helpers. Losses are returned in float32 (float64 for
float64 inputs); gradients flow back in the logits' dtype.
"""
from __future__ import annotations

from . import reference
from .ops import PUBLIC
from .ops._common import in_backward_recompute

init_prior = reference.init_prior
posterior_readouts = reference.posterior_readouts
globals().update(PUBLIC)  # dps_cross_entropy, soft_cross_entropy, supcon_loss, ...

__all__ = ["init_prior", "posterior_readouts", "in_backward_recompute"] + sorted(PUBLIC)

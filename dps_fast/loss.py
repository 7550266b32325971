"""DPSLoss: the drop-in nn.Module that owns the posterior bank."""
from __future__ import annotations

import torch
from torch import nn

from . import _validate as V
from .functional import dps_cross_entropy, init_prior, posterior_readouts, supcon_loss

CON_POSITIVES = ("hard", "soft", "views")


class DPSLoss(nn.Module):
    """Deep Probabilistic Supervision loss with its posterior bank.

    ``loss = DPSLoss(labels, num_classes)(logits, index)`` updates the bank rows of
    the batch (in training mode) and returns the cross-entropy against the
    posterior-mean targets (SPEC §2). With ``contrastive_weight > 0`` pass
    ``features`` ([V, B, d] projections of the V views) and the loss adds
    ``contrastive_weight * supcon_loss`` (SPEC §4) with positives from the
    posterior: ``con_positives="hard"`` (same argmax of the posterior, the default),
    ``"soft"`` (weights <T_i, T_j>) or ``"views"`` (NT-Xent, other views only).

    The bank is the persistent buffer ``alpha`` [N, C]: it is in ``state_dict()``
    and moves with ``.to(device)``; ``bank_dtype`` may be float32, bfloat16 or
    float16. In ``eval()`` mode the bank is read, never updated.

    Under DDP use :class:`dps_fast.distributed.DistributedDPSLoss`, which keeps one
    consistent (replicated or sharded) bank across ranks. This module's bank is a
    plain buffer: inside a DDP-wrapped model DDP would broadcast rank 0's bank over
    the others every step; kept outside, each rank updates only the rows its own
    batches touch.
    """

    def __init__(self, labels=None, num_classes: int | None = None, c: float = 100.0,
                 eps: float = 1e-2, gamma: float = 0.95, tau_e: float = 1.0,
                 target: str = "posterior", reduction: str = "mean",
                 contrastive_weight: float = 0.0, con_tau: float = 0.1,
                 con_positives: str = "hard", bank_dtype: torch.dtype = torch.float32,
                 prior: torch.Tensor | None = None, backend: str | None = None, device=None):
        super().__init__()
        self.gamma = V.gamma_value(gamma)
        self.tau_e = V.positive("tau_e", tau_e)
        if target not in V.TARGETS:
            raise ValueError(f"target must be one of {V.TARGETS}, got {target!r}")
        V.reduction_code(reduction)
        if contrastive_weight < 0:
            raise ValueError(f"contrastive_weight must be >= 0, got {contrastive_weight}")
        if con_positives not in CON_POSITIVES:
            raise ValueError(f"con_positives must be one of {CON_POSITIVES}, got {con_positives!r}")
        if contrastive_weight > 0 and reduction == "none":
            raise ValueError("contrastive_weight > 0 needs reduction 'mean' or 'sum'")
        self.con_tau = V.positive("con_tau", con_tau)
        self.target, self.reduction, self.backend = target, reduction, backend
        self.contrastive_weight, self.con_positives = float(contrastive_weight), con_positives
        if prior is not None:
            V.floating("prior", prior)
            if prior.dim() != 2 or not bool((prior > 0).all()):
                raise ValueError("prior must be a strictly positive tensor [N, C]")
            alpha = prior.detach().to(dtype=bank_dtype, device=device).clone()
            given = alpha.argmax(1)
        else:
            if labels is None or num_classes is None:
                raise ValueError("give labels and num_classes, or an explicit prior")
            alpha = init_prior(labels, num_classes, c, eps, dtype=bank_dtype, device=device)
            lab = torch.as_tensor(labels)
            given = (lab.argmax(1) if lab.is_floating_point() else lab).to(alpha.device, torch.int64)
        self.register_buffer("alpha", alpha)
        self.register_buffer("given_labels", given)

    @property
    def num_samples(self) -> int:
        return self.alpha.shape[0]

    @property
    def num_classes(self) -> int:
        return self.alpha.shape[1]

    def forward(self, logits: torch.Tensor, index: torch.Tensor,
                features: torch.Tensor | None = None) -> torch.Tensor:
        loss = dps_cross_entropy(logits, index, self.alpha, self.gamma, self.tau_e, self.target,
                                 self.reduction, update=self.training, backend=self.backend)
        if self.contrastive_weight > 0:
            if features is None:
                raise ValueError("contrastive_weight > 0: pass features [V, B, d]")
            labels = soft = None
            if self.con_positives != "views":
                with torch.no_grad():
                    rows = self.alpha[index].float()
                if self.con_positives == "hard":
                    labels = rows.argmax(1)
                else:
                    soft = rows / rows.sum(1, keepdim=True)
            con = supcon_loss(features, labels=labels, tau=self.con_tau, soft_targets=soft,
                              backend=self.backend)
            loss = loss + self.contrastive_weight * con
        return loss

    @torch.no_grad()
    def targets(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Current posterior-mean targets (float32) of rows ``index`` (all rows if None)."""
        a = (self.alpha if index is None else self.alpha[index]).float()
        return a / a.sum(1, keepdim=True)

    @torch.no_grad()
    def posterior(self, index: torch.Tensor | None = None) -> dict:
        """SPEC §5 read-outs: mean, alpha0, entropy, expected_entropy,
        mutual_information, label_error (1 - t[given label])."""
        a = self.alpha if index is None else self.alpha[index]
        lab = self.given_labels if index is None else self.given_labels[index]
        return posterior_readouts(a, lab)

    def extra_repr(self) -> str:
        return (f"N={self.num_samples}, C={self.num_classes}, gamma={self.gamma}, tau_e={self.tau_e}, "
                f"target={self.target!r}, bank_dtype={self.alpha.dtype}, "
                f"contrastive_weight={self.contrastive_weight}")

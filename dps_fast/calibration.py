"""Temperature scaling: fit one temperature T so that softmax(logits / T) matches
labels, or soft targets such as a DPS bank's posterior means.

    T = fit_temperature(val_logits, val_labels)                 # clean held-out labels

``fit_temperature`` minimises the cross-entropy of softmax(logits / T) against
integer labels (the NLL) or against rows of soft targets, over log T: a
log-spaced grid on [0.05, 20], then golden-section refinement around the grid's
best point. The objective is a cross-entropy of a one-parameter exponential
family in 1/T, so it has one minimum; the grid only guards the bracket.

Two fits that need no clean labels (issue #15, docs/results.md section 5):

- ``posterior_temperature`` (deprecated, issue 27): on training samples, the model's
  predictions scaled to match the bank's posterior means, or (``hard=True``) their argmax.
  It cannot find an under-confidence that DPS itself caused: the model was trained to match
  those means, so the fit returns T close to 1 (0.98-0.99 on the grid's sym40, ECE unchanged;
  docs/results.md §5), and the argmax, which the model agrees with, asks for T well below 0.1.
  For under-confidence without clean data use ``DPSLoss(tau_e="auto")``.
- ``fit_temperature(logits, noisy_labels, transition=bank_transition(means, labels))``:
  on held-out samples with noisy labels, through the noise transition that the
  bank estimates (which labels its argmax keeps and which it rejects).
"""
from __future__ import annotations

import math
import warnings

import torch

T_MIN, T_MAX = 0.05, 20.0
# The fit's own resolution, relative in T. Near its minimum the objective is flat to
# second order, so two float64 evaluations that differ only by rounding (eps ~ 2.2e-16)
# cannot order points closer than about sqrt(eps) = 1.5e-8 in log T (Numerical Recipes,
# section 10.1): a golden-section search stops there whatever its iteration count. The
# same fit on targets that differ only by rounding (rows scaled, then normalised) was
# seen 9.5e-9 apart on one x86-64 machine and agreeing on another. We quote 10x
# sqrt(eps), plus what is left of the bracket after ``iters`` steps.
FIT_RTOL = 10 * math.sqrt(torch.finfo(torch.float64).eps)


def fit_resolution(grid: int = 200, iters: int = 40) -> float:
    """How close two ``fit_temperature`` results on the same problem can be expected to
    agree, relative in T: the bracket left after ``iters`` golden-section steps on a
    ``grid``-point log grid, plus the float64 limit ``FIT_RTOL``."""
    width = 2 * (math.log(T_MAX) - math.log(T_MIN)) / grid * ((math.sqrt(5) - 1) / 2) ** iters
    return math.expm1(width) + FIT_RTOL


def _check_logits(logits) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError("logits must be a floating tensor [N, C]")
    if logits.shape[0] == 0:
        raise ValueError("fitting a temperature needs at least one sample")
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain NaN or Inf")
    return logits.detach().to(torch.float64)


def _check_targets(target, n: int, c: int) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(target).__name__}")
    if target.is_floating_point():
        if target.shape != (n, c):
            raise ValueError(f"soft targets must have shape [{n}, {c}], got {list(target.shape)}")
        if (target < 0).any() or not torch.isfinite(target).all():
            raise ValueError("soft targets must be finite and non-negative")
        s = target.to(torch.float64).sum(1, keepdim=True)
        if (s <= 0).any():
            raise ValueError("every soft target row needs a positive sum")
        return target.to(torch.float64) / s
    if target.dtype == torch.bool or target.dim() != 1 or target.shape[0] != n:
        raise ValueError(f"labels must be an integer tensor [{n}], got {target.dtype} {list(target.shape)}")
    if int(target.min()) < 0 or int(target.max()) >= c:
        bad = int(target.min()) if int(target.min()) < 0 else int(target.max())
        raise IndexError(f"label {bad} is out of range for {c} classes")
    return target.to(torch.int64)


def scaled_cross_entropy(logits: torch.Tensor, target: torch.Tensor, t: float, transition=None) -> float:
    """Mean cross-entropy of softmax(logits / t) (times ``transition``, if given) against
    labels [N] or soft targets [N, C]."""
    logp = torch.log_softmax(logits / t, -1)
    if transition is not None:
        logp = (logp.exp() @ transition).clamp_min(torch.finfo(logp.dtype).tiny).log()
    if target.is_floating_point():
        return float(-(target * logp).sum(1).mean())
    return float(-logp.gather(1, target[:, None]).mean())


def _check_transition(m, c: int) -> torch.Tensor:
    if not isinstance(m, torch.Tensor) or m.shape != (c, c) or not m.is_floating_point():
        raise ValueError(f"transition must be a floating tensor [{c}, {c}]")
    if (m < 0).any() or not torch.isfinite(m).all() or ((m.sum(1) - 1).abs() > 1e-4).any():
        raise ValueError("transition rows must be probability vectors (non-negative, summing to 1)")
    return m.detach().to(torch.float64)


def fit_temperature(logits, target, transition=None, grid: int = 200, iters: int = 40) -> float:
    """argmin_T of the cross-entropy of softmax(logits / T) against ``target``:
    integer labels [N] (the NLL) or soft targets [N, C] (rows are normalised).

    ``transition`` [C, C] (row i: the distribution of the observed label when the
    true class is i) fits T to noisy labels through the noise: the model's
    probabilities of the true class, pushed through the transition, should explain
    the noisy labels (forward correction, Patrini et al. 2017)."""
    z = _check_logits(logits)
    y = _check_targets(target, *z.shape)
    m = None if transition is None else _check_transition(transition, z.shape[1])

    def f(log_t):
        return scaled_cross_entropy(z, y, math.exp(log_t), m)

    lo0, hi0 = math.log(T_MIN), math.log(T_MAX)
    pts = [lo0 + k * (hi0 - lo0) / grid for k in range(grid + 1)]
    k = min(range(len(pts)), key=lambda i: f(pts[i]))
    lo, hi = pts[max(k - 1, 0)], pts[min(k + 1, grid)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(iters):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if f(a) < f(b):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)


def posterior_temperature(logits, posterior_means, hard: bool = False) -> float:
    """The temperature that makes the model's predictions on training samples
    match the DPS bank: its posterior means [N, C] (``hard=False``), or their
    argmax as labels (``hard=True``). Needs no clean labels.

    Deprecated: it returns T close to 1 for a model trained on the same bank (see the
    module's docstring); use ``DPSLoss(tau_e="auto")``, or fit_temperature on clean data."""
    warnings.warn("posterior_temperature is deprecated: a model trained on the bank matches its means, so the "
                  "fit returns T close to 1 (docs/results.md section 5); use DPSLoss(tau_e='auto') or "
                  "fit_temperature on clean held-out labels", DeprecationWarning, stacklevel=2)
    if not isinstance(posterior_means, torch.Tensor) or not posterior_means.is_floating_point():
        raise TypeError("posterior_means must be a floating tensor [N, C] (e.g. DPSLoss.targets(index))")
    target = posterior_means.argmax(1) if hard else posterior_means
    return fit_temperature(logits, target)


def bank_transition(posterior_means, labels, smoothing: float = 1.0) -> torch.Tensor:
    """Label-noise transition [C, C] estimated from a DPS bank: row i is the
    distribution of the given labels over the samples whose posterior argmax is i
    (the bank's argmax standing in for the true class), with ``smoothing`` added to
    every count. Close to the identity on clean labels."""
    if not isinstance(posterior_means, torch.Tensor) or posterior_means.dim() != 2 \
            or not posterior_means.is_floating_point():
        raise TypeError("posterior_means must be a floating tensor [N, C]")
    n, c = posterior_means.shape
    y = _check_targets(labels, n, c)
    if y.is_floating_point():
        raise TypeError("labels must be integer class ids [N]")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    counts = torch.full((c, c), float(smoothing), dtype=torch.float64)
    counts.index_put_((posterior_means.argmax(1).cpu(), y.cpu()), torch.ones(n, dtype=torch.float64),
                      accumulate=True)
    empty = counts.sum(1) == 0
    counts[empty] = torch.eye(c, dtype=torch.float64)[empty]
    return counts / counts.sum(1, keepdim=True)

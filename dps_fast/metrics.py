"""Calibration and evaluation metrics (docs/method.md §6).

All functions take class probabilities ``probs`` [N, C] (use ``logits.softmax(-1)``)
and integer labels [N] in [0, C), and return Python floats computed in float64.

Units: every value is a fraction, never a percent: accuracy and the ECE-type metrics
lie in [0, 1] (multiply by 100 to print percent, and name it so); NLL is in nats and
Brier in [0, 2]. Always report the ECE bin count (default 15, equal-width,
right-closed (lo, hi], with confidence 0 in the first bin).

Inputs are checked before anything is computed: ``probs`` must be a finite matrix of
entries >= 0 whose rows sum to 1 within :func:`row_sum_tolerance` (so logits, log-
probabilities and unnormalised scores are refused with a ValueError instead of giving
a meaningless number), and every label must lie in [0, C).
"""
from __future__ import annotations

import torch

# Roundings each probability goes through (exp, the normaliser's sum, the division,
# the cast to its dtype), with slack: the row sum's error in ulps of the dtype.
_ROUNDINGS_PER_ENTRY = 16


def row_sum_tolerance(dtype: torch.dtype, num_classes: int) -> float:
    """How far from 1 a row of valid probabilities of ``dtype`` may sum.

    Each entry carries a relative error of a few ulps of its dtype, and as the entries
    sum to 1 these add up to a few ulps in all: ``16 * eps(dtype)``. The normaliser is
    a sum of C terms, accumulated in float32 at best (torch reduces half types in
    float32), whose error grows to C ulps of float32: ``+ 16 * C * eps(float32)``.
    float64 input is measured in float32 ulps, as it is most often float32 cast up.
    (float32, C = 10: 2.1e-5; C = 1000: 1.9e-3; float16: + 1.6e-2; bfloat16: + 0.125.)
    """
    f32 = torch.finfo(torch.float32).eps
    ulp = max(torch.finfo(dtype).eps, f32)
    return _ROUNDINGS_PER_ENTRY * (ulp + num_classes * f32)


def check_probabilities(probs: torch.Tensor, what: str = "probs") -> None:
    """Raises ValueError unless ``probs`` [N, C] is finite, >= 0, with rows summing to 1
    within :func:`row_sum_tolerance`; the message names the first offending row."""
    p = probs.detach()
    bad = ~torch.isfinite(p).all(1)
    if bool(bad.any()):
        raise ValueError(f"{what} must be finite class probabilities: row {_first(bad)} holds NaN or inf")
    bad = (p < 0).any(1)
    if bool(bad.any()):
        row = _first(bad)
        raise ValueError(f"{what} must be class probabilities (>= 0, rows summing to 1; from logits use "
                         f"logits.softmax(-1)): row {row} has the negative entry {float(p[row].min()):.6g}")
    sums = p.to(torch.float64).sum(1)
    tol = row_sum_tolerance(p.dtype, p.shape[1])
    bad = (sums - 1).abs() > tol
    if bool(bad.any()):
        row = _first(bad)
        raise ValueError(f"{what} must be class probabilities (rows summing to 1; from logits use "
                         f"logits.softmax(-1)): row {row} sums to {float(sums[row]):.6g}, more than {tol:.2g} "
                         f"from 1 (the tolerance of {str(p.dtype).replace('torch.', '')} at C = {p.shape[1]})")


def _first(mask: torch.Tensor) -> int:
    return int(mask.nonzero()[0, 0])


def _check(probs, labels):
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or not probs.is_floating_point():
        raise ValueError("probs must be a floating tensor [N, C] of class probabilities")
    labels = torch.as_tensor(labels, device=probs.device)
    if labels.dim() != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(f"labels must have shape [{probs.shape[0]}], got {list(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"metrics need at least one sample and one class, got probs of shape {list(probs.shape)}")
    check_probabilities(probs)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= probs.shape[1]:
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}) (the columns of probs), got range [{lo}, {hi}]")
    return probs.detach().to(torch.float64), labels.to(torch.int64)


def _bin_index(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    inner = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=conf.device)[1:-1]
    return torch.bucketize(conf.contiguous(), inner, right=False)  # (lo, hi], 0 in the first bin


def _binned_gap(conf: torch.Tensor, hit: torch.Tensor, n_bins: int) -> float:
    idx = _bin_index(conf, n_bins)
    n = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, torch.ones_like(conf))
    sc = torch.zeros_like(n).index_add_(0, idx, conf)
    sa = torch.zeros_like(n).index_add_(0, idx, hit)
    # sum_b (n_b / n) |acc_b - conf_b| = sum_b |sum acc - sum conf| / n
    return float((sa - sc).abs().sum() / conf.shape[0])


def ece(probs, labels, n_bins: int = 15) -> float:
    """Top-label expected calibration error, a fraction in [0, 1]."""
    return _ece(*_check(probs, labels), n_bins)


def _ece(p, y, n_bins):
    conf, pred = p.max(1)
    return _binned_gap(conf, (pred == y).to(torch.float64), n_bins)


def classwise_ece(probs, labels, n_bins: int = 15) -> float:
    """Classwise ECE (Kull et al. 2019), a fraction in [0, 1]: the mean over classes of
    the binned gap between p_k and the frequency of class k."""
    return _classwise_ece(*_check(probs, labels), n_bins)


def _classwise_ece(p, y, n_bins):
    gaps = [_binned_gap(p[:, k], (y == k).to(torch.float64), n_bins) for k in range(p.shape[1])]
    return float(sum(gaps) / len(gaps))


def nll(probs, labels) -> float:
    """Mean negative log-likelihood of the labels, in nats."""
    return _nll(*_check(probs, labels))


def _nll(p, y):
    py = p.gather(1, y[:, None])[:, 0].clamp_min(torch.finfo(torch.float64).tiny)
    return float(-py.log().mean())


def brier(probs, labels) -> float:
    """Sum over classes of the squared error, mean over samples (in [0, 2])."""
    return _brier(*_check(probs, labels))


def _brier(p, y):
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(torch.float64)
    return float(((p - onehot) ** 2).sum(1).mean())


def accuracy(probs, labels) -> float:
    """Top-1 accuracy, a fraction in [0, 1]."""
    return _accuracy(*_check(probs, labels))


def _accuracy(p, y):
    return float((p.argmax(1) == y).to(torch.float64).mean())


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their average rank."""
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    avg = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = avg[inverse]
    return ranks


def ood_auroc(probs_in, probs_out) -> float:
    """AUROC of the max-softmax score separating in-distribution (positive) from
    out-of-distribution samples; 0.5 is chance. Both inputs are checked as
    probability matrices [N, C] over the same C classes."""
    for name, p in (("probs_in", probs_in), ("probs_out", probs_out)):
        if not isinstance(p, torch.Tensor) or p.dim() != 2 or not p.is_floating_point() or 0 in p.shape:
            raise ValueError(f"{name} must be a non-empty floating tensor [N, C] of class probabilities")
        check_probabilities(p, name)
    if probs_in.shape[1] != probs_out.shape[1]:
        raise ValueError(f"probs_in and probs_out must have the same classes, got C = {probs_in.shape[1]} "
                         f"and {probs_out.shape[1]}")
    s_in = probs_in.detach().to(torch.float64).max(1).values
    s_out = probs_out.detach().to(torch.float64).max(1).values.to(s_in.device)
    positive = torch.cat([torch.ones_like(s_in, dtype=torch.bool), torch.zeros_like(s_out, dtype=torch.bool)])
    return auroc(torch.cat([s_in, s_out]), positive)


def auroc(scores, positive) -> float:
    """Area under the ROC curve of ``scores`` [N] separating ``positive`` [N] (bool)
    from the rest (Mann-Whitney, ties count one half); 0.5 is chance."""
    s = torch.as_tensor(scores).detach().to(torch.float64).flatten()
    pos = torch.as_tensor(positive, device=s.device).bool().flatten()
    if s.shape != pos.shape:
        raise ValueError(f"scores and positive must have the same length, got {s.numel()} and {pos.numel()}")
    if bool(s.isnan().any()):  # NaN has no rank: sorting would place it arbitrarily (inf ranks fine)
        raise ValueError(f"scores must not be NaN, got {int(s.isnan().sum())} NaN of {s.numel()}")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative sample")
    ranks = _average_ranks(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def summary(probs, labels, n_bins: int = 15) -> dict:
    """accuracy, ece, classwise_ece (fractions in [0, 1], like the functions of the same
    names), nll, brier and n_bins in one dict; the input is checked once."""
    p, y = _check(probs, labels)
    return {
        "accuracy": _accuracy(p, y),
        "ece": _ece(p, y, n_bins),
        "classwise_ece": _classwise_ece(p, y, n_bins),
        "nll": _nll(p, y),
        "brier": _brier(p, y),
        "n_bins": n_bins,
    }

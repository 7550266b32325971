"""Calibration and evaluation metrics (docs/method.md §6).

All functions take class probabilities ``probs`` [N, C] (rows summing to 1; use
``logits.softmax(-1)``) and integer labels [N], and return Python floats computed
in float64. ECE-type metrics are fractions in [0, 1]: multiply by 100 for percent,
and always report the bin count (default 15, equal-width, right-closed (lo, hi],
with confidence 0 in the first bin).
"""
from __future__ import annotations

import torch


def _check(probs, labels):
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or not probs.is_floating_point():
        raise ValueError("probs must be a floating tensor [N, C] of class probabilities")
    labels = torch.as_tensor(labels, device=probs.device)
    if labels.dim() != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(f"labels must have shape [{probs.shape[0]}], got {list(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if probs.shape[0] == 0:
        raise ValueError("metrics need at least one sample")
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
    """Top-label expected calibration error."""
    p, y = _check(probs, labels)
    conf, pred = p.max(1)
    return _binned_gap(conf, (pred == y).to(torch.float64), n_bins)


def classwise_ece(probs, labels, n_bins: int = 15) -> float:
    """Classwise ECE (Kull et al. 2019): the mean over classes of the binned gap
    between p_k and the frequency of class k."""
    p, y = _check(probs, labels)
    gaps = [_binned_gap(p[:, k], (y == k).to(torch.float64), n_bins) for k in range(p.shape[1])]
    return float(sum(gaps) / len(gaps))


def nll(probs, labels) -> float:
    p, y = _check(probs, labels)
    py = p.gather(1, y[:, None])[:, 0].clamp_min(torch.finfo(torch.float64).tiny)
    return float(-py.log().mean())


def brier(probs, labels) -> float:
    """Sum over classes of the squared error, mean over samples."""
    p, y = _check(probs, labels)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(torch.float64)
    return float(((p - onehot) ** 2).sum(1).mean())


def accuracy(probs, labels) -> float:
    p, y = _check(probs, labels)
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
    out-of-distribution samples; 0.5 is chance."""
    for name, p in (("probs_in", probs_in), ("probs_out", probs_out)):
        if not isinstance(p, torch.Tensor) or p.dim() != 2 or p.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty tensor [N, C] of class probabilities")
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
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative sample")
    ranks = _average_ranks(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def summary(probs, labels, n_bins: int = 15) -> dict:
    """accuracy, ece (%), classwise_ece (%), nll, brier in one dict."""
    return {
        "accuracy": accuracy(probs, labels),
        "ece_pct": 100 * ece(probs, labels, n_bins),
        "classwise_ece_pct": 100 * classwise_ece(probs, labels, n_bins),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "n_bins": n_bins,
    }

"""Likely label errors, read from the DPS posterior bank (docs/method.md, "Finding label issues").

Every training sample's Dirichlet row ``alpha_i`` is a running estimate of its class:
the label's prior plus the discounted softmax evidence of every visit. The functions
here turn a bank into a ranked list of likely label errors, in one pass over chunks of
rows (memory O(chunk * C) for the bank, plus a few bytes per local row for the scores),
on one process or on the ranks of a sharded bank without gathering it:

- :func:`label_issue_scores`: per-row scores (higher = more likely wrong) and the
  suggested class (the most probable class other than the given label).
- :func:`estimate_noise_rate`: the fraction of wrong labels the bank implies.
- :func:`find_label_issues`: selection by a score threshold, by a rate, or by the
  estimated rate (the default); returns a ranked :class:`LabelIssues`.

A *source* is a ``DPSLoss`` (its ``alpha`` buffer and ``given_labels``), a bank tensor
[N, C] with ``labels`` [N], or any object with ``iter_rows(chunk_rows)`` yielding
``(global_ids, alpha_rows)`` for the rows this process holds (each global row on exactly
one rank) and ``given_labels`` [N] (or pass ``labels``). A source with ``world > 1``
(and optional ``group``) is treated as sharded: each rank scores its own rows and the
ranks exchange only small tensors (counts, 4 histograms of 65,536 bins, the selected
issues); every rank returns the same global result.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass

import torch

from .banks.collective import collective_of
from .prior import init_prior

SCORES = ("label_error", "margin", "evidence")
DEFAULT_SCORE = "margin"  # ties label_error on symmetric noise, better on class-dependent noise (results/label-issues.md)
RATE_ESTIMATES = ("argmax", "expected")
DEFAULT_RATE_ESTIMATE = "argmax"
DEFAULT_CHUNK_ROWS = 65536
_DIGIT_BITS, _DIGITS = 16, 4  # radix select over 64-bit keys, 16 bits per round


# ---------------------------------------------------------------------------------- per-row maths
def label_issue_scores(rows: torch.Tensor, given: torch.Tensor, score: str = DEFAULT_SCORE):
    """Scores (float32 [n], higher = more likely a wrong label) and suggested classes
    (int64 [n], the most probable class other than the given one) of bank rows.

    ``rows``: alpha rows [n, C] (any floating dtype; computed in float32).
    ``given``: the given labels [n]. With t = alpha / alpha0 the posterior mean:

    - ``"label_error"``: 1 - t[given], the posterior mass off the label
      (``DPSLoss.posterior()["label_error"]``); in [0, 1].
    - ``"margin"``: max_{j != given} t[j] - t[given]; in [-1, 1], > 0 when another
      class is more probable than the label.
    - ``"evidence"``: the margin weighted by the evidence behind it: with j the best
      other class, t[j] / (t[j] + t[given]) is Beta(alpha_j, alpha_given) under the
      posterior; the score is its z-statistic against 1/2,
      (m - 1/2) / sqrt(m (1 - m) / (alpha_j + alpha_given + 1)). Large only when
      the label is out-voted by much evidence; > 1.645 means a posterior probability
      of about 95% that class j is more likely than the label.

    With one class (C = 1) no label can be wrong: every score is 0, the suggestion the label.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    _check_rows(rows, given)
    if rows.shape[1] == 1:  # one class: every label is right and there is no other class to suggest
        return torch.zeros(rows.shape[0], device=rows.device), given.to(rows.device, torch.int64).clone()
    a = rows.float()
    g = given.to(device=a.device, dtype=torch.int64)[:, None]
    a_y = a.gather(1, g).squeeze(1)
    a_other = a.scatter(1, g, float("-inf"))
    a_best, suggested = a_other.max(1)
    a0 = a.sum(1)
    if score == "label_error":
        s = 1.0 - a_y / a0
    elif score == "margin":
        s = (a_best - a_y) / a0
    else:
        pair = a_best + a_y
        m = a_best / pair
        s = (m - 0.5) / torch.sqrt(m * (1 - m) / (pair + 1)).clamp_min(1e-12)
    return s, suggested


def _check_rows(rows: torch.Tensor, given: torch.Tensor) -> None:
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or not rows.is_floating_point():
        raise ValueError("bank rows must be a floating tensor [n, C]")
    if not isinstance(given, torch.Tensor) or given.dim() != 1 or given.shape[0] != rows.shape[0]:
        raise ValueError(f"given labels must be a tensor [{rows.shape[0]}], got "
                         f"{list(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__}")
    if given.is_floating_point() or given.dtype == torch.bool:
        raise TypeError(f"given labels must be integers, got {given.dtype}")
    if given.numel() and (int(given.min()) < 0 or int(given.max()) >= rows.shape[1]):
        raise ValueError(f"given labels must lie in [0, {rows.shape[1]}), got range "
                         f"[{int(given.min())}, {int(given.max())}]")


def stored_prior(dtype: torch.dtype, c: float, eps: float) -> tuple[float, float]:
    """(c, eps) as a bank of ``dtype`` stores them (init_prior's own fill: in bfloat16 eps =
    0.01 is stored as 0.010009765625), exact in float64."""
    p = init_prior(torch.zeros(1, dtype=torch.int64), 2, c, eps, dtype)
    return float(p[0, 0]), float(p[0, 1])


def evidence_rows(rows: torch.Tensor, given: torch.Tensor, c: float, eps: float, gamma: float) -> torch.Tensor:
    """The evidence part of bank rows (float32; computed in float64): alpha minus what is left
    of the label prior.

    Each visit adds evidence of mass 1 and discounts everything by gamma, so after t
    visits alpha0 = gamma^t S0 + (1 - gamma^t) / (1 - gamma) with S0 = c + (C - 1) eps
    (docs/method.md): the row's mass tells gamma^t, and alpha - gamma^t * prior is the
    discounted sum of the model's predictions alone. The prior is the one the bank stores
    (c and eps rounded to the rows' dtype, :func:`stored_prior`), so that a row never
    visited (the stored prior bit for bit) has zero evidence in every bank dtype."""
    return _evidence64(rows, given, c, eps, gamma).float()


def _evidence64(rows, given, c, eps, gamma) -> torch.Tensor:
    c_s, eps_s = stored_prior(rows.dtype, c, eps)
    a = rows.double()  # float64 holds every 16/32-bit value exactly: the comparison below is exact
    s0 = c_s + (a.shape[1] - 1) * eps_s
    prior = torch.full_like(a, eps_s).scatter_(1, given.to(a.device, torch.int64)[:, None], c_s)
    fresh = (a == prior).all(1)
    if gamma >= 1.0:
        frac = torch.ones_like(a[:, 0])
    else:
        limit = 1.0 / (1.0 - gamma)
        if abs(s0 - limit) < 1e-6 * limit:
            raise ValueError("the prior mass c + (C-1) eps equals 1 / (1 - gamma): the row mass does not "
                             "tell how much of the prior is left")
        frac = ((a.sum(1) - limit) / (s0 - limit)).clamp(0.0, 1.0).masked_fill_(fresh, 1.0)
    return torch.sub(a, prior.mul_(frac[:, None]), out=prior).clamp_min_(0.0)


# ---------------------------------------------------------------------------------- sources
class _Source:
    """Uniform view of a bank: iter_rows(chunk) -> (global ids, rows), labels, layout."""

    def __init__(self, source, labels=None, prior_params=None, require_labels=True):
        self.source, self.world = source, int(getattr(source, "world", 1) or 1)
        self.params = _check_params(prior_params) if prior_params is not None else _dps_params(source)
        if isinstance(source, torch.Tensor):
            self._rows, self._iter = source, None
        elif hasattr(source, "iter_rows"):  # every DPSLoss kind (local, host, replicated, sharded)
            self._rows, self._iter = None, source.iter_rows
        else:
            raise TypeError(f"cannot read bank rows from a {type(source).__name__}: pass a DPSLoss, a bank "
                            f"tensor [N, C] with labels, or an object with iter_rows(chunk_rows)")
        if self._rows is not None:
            if self._rows.dim() != 2 or not self._rows.is_floating_point():
                raise ValueError("the bank must be a floating tensor [N, C]")
            self.world = 1
        if labels is None:
            labels = getattr(source, "given_labels", None)
        if labels is None:
            if require_labels:
                raise ValueError("this source carries no given labels: pass labels=[N] (integer class ids)")
            self.labels = None
            return
        self.labels = torch.as_tensor(labels)
        if self.labels.dim() != 1 or self.labels.is_floating_point() or self.labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class ids [N], got {self.labels.dtype} "
                             f"{list(self.labels.shape)}")
        n = self._rows.shape[0] if self._rows is not None else getattr(source, "num_samples", None)
        if isinstance(n, int) and self.labels.shape[0] != n:  # checked on every rank alike
            raise ValueError(f"labels has {self.labels.shape[0]} entries for a bank of {n} rows")
        n_cls = self.num_classes or getattr(source, "num_classes", None)
        if isinstance(n_cls, int) and self.labels.numel() and not 0 <= int(self.labels.min()) <= int(
                self.labels.max()) < n_cls:  # checked on every rank alike, before any collective
            raise ValueError(f"given labels must lie in [0, {n_cls}), got range "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")

    def iter_rows(self, chunk_rows: int):
        if self._iter is not None:
            yield from self._iter(chunk_rows)
            return
        n = self._rows.shape[0]
        for i in range(0, n, chunk_rows):
            yield torch.arange(i, min(n, i + chunk_rows), device=self._rows.device), self._rows[i:i + chunk_rows]

    @property
    def num_rows(self) -> int | None:
        """N when this process holds the whole bank as one tensor, else None."""
        return self._rows.shape[0] if self._rows is not None else None

    @property
    def num_classes(self) -> int | None:
        return self._rows.shape[1] if self._rows is not None else None

    def given(self, ids: torch.Tensor) -> torch.Tensor:
        return self.labels.to(ids.device)[ids]


def _dps_params(source) -> dict | None:
    """(c, eps, gamma) of the bank's label prior, when the source records them."""
    vals = {k: getattr(source, k, None) for k in ("c", "eps", "gamma")}
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals.values())
    return {k: float(v) for k, v in vals.items()} if ok else None


def _check_params(p) -> dict:
    if not isinstance(p, dict) or set(p) != {"c", "eps", "gamma"}:
        raise ValueError(f"prior_params must be a dict with keys c, eps, gamma; got {p!r}")
    out = {k: float(v) for k, v in p.items()}
    if not (out["c"] > 0 and out["eps"] > 0 and 0 < out["gamma"] <= 1):
        raise ValueError(f"prior_params need c > 0, eps > 0 and gamma in (0, 1]; got {p!r}")
    return out


# ---------------------------------------------------------------------------------- collectives
# ---------------------------------------------------------------------------------- ranking
def _rank_keys(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like (score, -id): larger key = ranked earlier; unique per row,
    so a global top-k is exact and ties in score go to the smaller id."""
    bits = scores.float().contiguous().view(torch.int32).to(torch.int64)
    s = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    return s * (1 << 32) + ((1 << 32) - 1 - ids.to(torch.int64))


def _kth_largest_key(keys: torch.Tensor, k: int, comm) -> int:
    """The k-th largest key over all ranks (1 <= k <= total): a radix select with one
    all-reduced histogram of 2^16 bins per 16-bit digit, most significant first."""
    u_digits = []
    cand = torch.ones_like(keys, dtype=torch.bool)
    remaining = k
    bins = 1 << _DIGIT_BITS
    for r in range(_DIGITS):
        shift = _DIGIT_BITS * (_DIGITS - 1 - r)
        digit = (keys >> shift) & (bins - 1)
        if r == 0:
            digit = digit ^ (bins >> 1)  # the sign bit: negative keys sort first
        hist = torch.bincount(digit[cand], minlength=bins)
        hist = comm.sum_(hist.to(torch.int64))
        from_top = hist.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, torch.tensor([remaining], device=from_top.device)))
        d = bins - 1 - j
        remaining -= int(from_top[j]) - int(hist[d])
        u_digits.append(d)
        cand &= digit == d
    u = 0
    for d in u_digits:
        u = (u << _DIGIT_BITS) | d
    return u - (1 << 63)


# ---------------------------------------------------------------------------------- one pass
def _rate_stats(rows, given, params):
    """([rows with evidence, of which argmax != label, sum of 1 - t[label]], seen [n]) of a
    chunk, on the evidence part (the label prior removed); (zeros, None) when the prior is
    unknown. ``seen``: the rows with evidence, i.e. visited at least once."""
    if params is None:
        return torch.zeros(3, dtype=torch.float64, device=rows.device), None
    e = _evidence64(rows, given, **params)
    mass = e.sum(1)
    seen = mass > 0
    g = given.to(e.device, torch.int64)[:, None]
    off = 1 - e.gather(1, g).squeeze(1) / mass.clamp_min(1e-300)
    flips = (e.argmax(1) != g[:, 0]) & seen
    stats = torch.stack([seen.sum().double(), flips.sum().double(), (off * seen).sum()])
    return stats, seen


def score_bank(source, labels=None, score: str = DEFAULT_SCORE, chunk_rows: int = DEFAULT_CHUNK_ROWS,
               prior_params: dict | None = None):
    """Scores every row this process holds, chunk by chunk. Returns ``(ids, scores,
    suggested, given, stats)``: the global ids of this process's rows, their
    :func:`label_issue_scores` and suggested classes, their given labels, and the rate
    statistics summed over all ranks (float64 [4]: rows, rows with evidence, evidence
    argmax != label, sum of evidence mass off the label)."""
    return _score_pass(source, labels, score, chunk_rows, prior_params)[:5]


def _score_pass(source, labels, score, chunk_rows, prior_params):
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    src = _Source(source, labels, prior_params)
    parts, stats, bad = [], None, 0
    for ids, rows in src.iter_rows(_chunk_rows(src, source, chunk_rows)):
        given = src.given(ids)
        s, sugg = label_issue_scores(rows, given, score)
        rate, seen = _rate_stats(rows, given, src.params)
        st = torch.cat([torch.tensor([float(len(ids))], dtype=torch.float64, device=s.device), rate.to(s.device)])
        stats = st if stats is None else stats + st
        bad += int((~torch.isfinite(s)).sum())
        parts.append((ids, s, sugg, given, seen))
    device = parts[0][1].device if parts else src.labels.device
    stats = torch.zeros(4, dtype=torch.float64, device=device) if stats is None else stats
    comm = collective_of(src.source, src.world)
    stats = comm.sum_(torch.cat([stats, torch.tensor([float(bad)], dtype=torch.float64, device=device)]))
    if stats[4] > 0:  # raised on every rank together, never a hang
        raise ValueError(f"{int(stats[4])} bank rows give non-finite scores (a corrupted bank?)")
    cat = (lambda i, dt: torch.cat([p[i].to(device) for p in parts]) if parts else torch.zeros(0, dtype=dt,
                                                                                              device=device))
    seen = cat(4, torch.bool) if src.params is not None else None
    return (cat(0, torch.int64), cat(1, torch.float32), cat(2, torch.int64), cat(3, torch.int64), stats[:4],
            comm, seen)


# Scratch of one chunk of the scoring pass, in bytes: about 32 bytes an entry (float32 scores,
# float64 evidence), so 65,536 rows would be 2 GB at C = 1000. find_label_issues of a DPSLoss
# of 100,000 x 1000 float32, one thread: 1.8 s CPU, peak RSS +0.36 GB with rows of 65,536 and
# float32 evidence; 2.0 s CPU, +0.00 GB with this cap and float64 evidence.
SCORE_SCRATCH_BYTES = 256 * 2 ** 20


def _chunk_rows(src, source, chunk_rows: int) -> int:
    """``chunk_rows``, capped so that a chunk's scratch stays within SCORE_SCRATCH_BYTES at any C."""
    n_cls = src.num_classes or getattr(source, "num_classes", None)
    if not isinstance(n_cls, int) or n_cls < 1:
        return chunk_rows
    return min(chunk_rows, max(1, SCORE_SCRATCH_BYTES // (32 * n_cls)))


_NO_PRIOR = ("estimating the noise rate needs the bank's label prior (c, eps, gamma) to tell the model's "
             "evidence from what is left of the prior: pass prior_params={'c': ..., 'eps': ..., 'gamma': ...} "
             "(the DPSLoss arguments), or select by rate= or threshold=")


def _rate_from_stats(stats: torch.Tensor, method: str) -> float:
    seen = float(stats[1])
    if seen == 0:
        return 0.0
    return float(stats[2] if method == "argmax" else stats[3]) / seen


def estimate_noise_rate(source, labels=None, method: str = DEFAULT_RATE_ESTIMATE,
                        chunk_rows: int = DEFAULT_CHUNK_ROWS, prior_params: dict | None = None) -> float:
    """The fraction of wrong labels the bank implies, over the rows that have evidence.

    The label prior is removed first when the source records (c, eps, gamma) (see
    :func:`evidence_rows`): what is left is the discounted sum of the model's own
    predictions, an estimate of the true class made without the label. Then
    ``"argmax"`` counts the rows whose evidence argmax differs from the given label,
    and ``"expected"`` sums the evidence mass off the label, 1 - t[label] (unbiased when
    the predictions are calibrated). The posterior itself would not do: until the
    prior has faded (c gamma^t << 1 / (1 - gamma)) it keeps almost every argmax on the
    label. ``prior_params`` ({"c", "eps", "gamma"}) gives the prior for a source that
    does not record it (a bank tensor); without it this raises ValueError. A row never
    visited has no evidence in any bank dtype (the prior is the one the bank stores,
    :func:`stored_prior`), so it neither counts nor dilutes the rate."""
    if method not in RATE_ESTIMATES:
        raise ValueError(f"method must be one of {RATE_ESTIMATES}, got {method!r}")
    _require_params(source, prior_params)
    return _rate_from_stats(score_bank(source, labels, DEFAULT_SCORE, chunk_rows, prior_params)[4], method)


def _require_params(source, prior_params) -> None:
    if prior_params is None and _dps_params(source) is None:
        raise ValueError(_NO_PRIOR)


# ---------------------------------------------------------------------------------- selection
@dataclass
class LabelIssues:
    """The selected likely label errors, ranked (most likely first).

    ``indices`` (global sample ids), ``scores``, ``given_labels`` and
    ``suggested_labels`` are aligned tensors [k]. ``selection`` says how k was chosen
    ("threshold", "rate" or "estimated rate"); ``estimated_rate`` is the estimate
    (None unless used); ``cutoff`` the score of the last selected row."""
    indices: torch.Tensor
    scores: torch.Tensor
    given_labels: torch.Tensor
    suggested_labels: torch.Tensor
    score: str
    selection: str
    num_samples: int
    estimated_rate: float | None = None
    num_visited: int | None = None  # rows with evidence (known with the prior); only these are flagged

    def __len__(self) -> int:
        return int(self.indices.numel())

    @property
    def rate(self) -> float:
        """The fraction of the samples flagged."""
        return len(self) / self.num_samples if self.num_samples else 0.0

    @property
    def cutoff(self) -> float | None:
        """The score of the last flagged sample (None when none is flagged)."""
        return float(self.scores[-1]) if len(self) else None

    def to_csv(self, path: str) -> None:
        """index, given_label, suggested_label, score, rank (1 = most likely wrong)."""
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "given_label", "suggested_label", "score", "rank"])
            for r, (i, g, s, sc) in enumerate(zip(self.indices.tolist(), self.given_labels.tolist(),
                                                  self.suggested_labels.tolist(), self.scores.tolist()), 1):
                w.writerow([i, g, s, f"{sc:.6g}", r])

    def summary(self) -> dict:
        """The selection in a JSON-ready dict: score, selection, counts, rates and cutoff."""
        return {"score": self.score, "selection": self.selection, "num_issues": len(self),
                "num_samples": self.num_samples, "num_visited": self.num_visited, "rate": self.rate,
                "estimated_rate": self.estimated_rate, "cutoff": self.cutoff}


def _check_selection(threshold, rate, rate_estimate, max_issues) -> None:
    """find_label_issues' selection arguments, checked on every rank alike before any collective."""
    if threshold is not None and rate is not None:
        raise ValueError("give either threshold or rate, not both")
    if rate is not None and not (0.0 <= float(rate) <= 1.0):
        raise ValueError(f"rate must lie in [0, 1], got {rate}")
    if threshold is not None and not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if rate_estimate not in RATE_ESTIMATES:
        raise ValueError(f"rate_estimate must be one of {RATE_ESTIMATES}, got {rate_estimate!r}")
    if max_issues is not None and (not isinstance(max_issues, int) or max_issues < 0):
        raise ValueError(f"max_issues must be a non-negative int, got {max_issues!r}")


def find_label_issues(source, labels=None, *, score: str = DEFAULT_SCORE, threshold: float | None = None,
                      rate: float | None = None, rate_estimate: str = DEFAULT_RATE_ESTIMATE,
                      max_issues: int | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                      prior_params: dict | None = None) -> LabelIssues:
    """Ranked likely label errors of a DPS bank.

    ``source``: a ``DPSLoss``, a ``DistributedDPSLoss`` (pass ``labels``), a bank
    tensor [N, C] with ``labels`` [N], or an object with ``iter_rows`` (module doc).
    ``score``: one of :data:`SCORES` (:func:`label_issue_scores`; default
    ``"margin"``, the best other class's mass minus the label's). Selection, one of:

    - ``threshold``: every row whose score exceeds it;
    - ``rate``: the ``round(rate * N)`` highest-scoring rows;
    - neither (default): the rate :func:`estimate_noise_rate` (``rate_estimate``) finds
      over the visited rows, applied to them: the ``round(rate * visited)`` highest
      (needs the bank's prior: a source that records c, eps, gamma, or ``prior_params``).

    When the prior is known, a row never visited (still the stored prior, no evidence
    about its label) is never selected, whatever the selection; ``num_visited`` counts the
    rows that can be. ``labels`` must have one entry per sample (N), else a ValueError.

    ``max_issues`` caps the count. Ties in score go to the smaller sample id. On a
    sharded source every rank returns the same result; the ranks exchange counts,
    at most four histograms of 65,536 bins and the selected rows, never bank rows.
    """
    _check_selection(threshold, rate, rate_estimate, max_issues)
    if threshold is None and rate is None:
        _require_params(source, prior_params)
    ids, scores, sugg, given, stats, comm, seen = _score_pass(source, labels, score, chunk_rows, prior_params)
    n = int(stats[0])
    eligible = n
    if seen is not None:  # a row never visited has no evidence about its label: never flagged
        ids, scores, sugg, given = ids[seen], scores[seen], sugg[seen], given[seen]
        eligible = int(stats[1])
    est = None
    if threshold is not None:
        above = torch.tensor([int((scores > float(threshold)).sum())], dtype=torch.int64, device=scores.device)
        k, how = int(comm.sum_(above)), "threshold"
    elif rate is not None:
        k, how = int(round(float(rate) * n)), "rate"
    else:  # estimated over the visited rows, so applied to them
        est = _rate_from_stats(stats, rate_estimate)
        k, how = int(round(est * eligible)), "estimated rate"
    k = min(k, eligible, max_issues if max_issues is not None else n)
    keys = _rank_keys(scores, ids)
    sel = keys >= _kth_largest_key(keys, k, comm) if k > 0 else torch.zeros_like(keys, dtype=torch.bool)
    rows = torch.stack([ids[sel].double(), scores[sel].double(), sugg[sel].double(), given[sel].double()], 1)
    rows = comm.gather_rows(rows)
    got_ids = rows[:, 0].long()
    order = torch.argsort(_rank_keys(rows[:, 1].float(), got_ids), descending=True)
    rows = rows[order]
    return LabelIssues(rows[:, 0].long(), rows[:, 1].float(), rows[:, 3].long(), rows[:, 2].long(), score,
                       how, n, est, None if seen is None else eligible)


def all_scores(source, labels=None, score: str = DEFAULT_SCORE, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """The scores of all N rows, in sample order, on every rank (for evaluation, e.g.
    AUROC against a known flip mask; a sharded source sends 12 bytes a row, never a bank row)."""
    ids, scores, _, _, stats, comm, _ = _score_pass(source, labels, score, chunk_rows, None)
    rows = comm.gather_rows(torch.stack([ids.double(), scores.double()], 1))
    out = torch.empty(int(stats[0]), dtype=torch.float32, device=rows.device)
    out[rows[:, 0].long()] = rows[:, 1].float()
    return out


def detection_metrics(scores: torch.Tensor, is_error: torch.Tensor, selected: torch.Tensor) -> dict:
    """How well ``scores`` [N] (higher = more likely wrong) and the ``selected`` rows
    (a bool mask [N] or ids) find the true label errors ``is_error`` [N] (bool).

    precision, recall, F1 of the selection; AUROC of the scores (ties averaged);
    precision@k of the k highest scores with k = the number of true errors (equal to
    recall@k there); the average precision of the ranking."""
    from .metrics import auroc

    err = torch.as_tensor(is_error).bool().cpu()
    s = torch.as_tensor(scores).double().cpu()
    sel = torch.as_tensor(selected).cpu()
    if sel.dtype != torch.bool:
        mask = torch.zeros_like(err)
        mask[sel.long()] = True
        sel = mask
    if not (s.shape == err.shape == sel.shape) or s.dim() != 1:
        raise ValueError(f"scores, is_error and selected must be [N] alike; got {list(s.shape)}, "
                         f"{list(err.shape)}, {list(sel.shape)}")
    tp, n_err, n_sel = int((sel & err).sum()), int(err.sum()), int(sel.sum())
    p = tp / n_sel if n_sel else 0.0
    r = tp / n_err if n_err else 0.0
    order = torch.argsort(s, descending=True, stable=True)
    hits = err[order].double().cumsum(0)
    prec_at = hits / torch.arange(1, len(s) + 1, dtype=torch.float64)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "auroc": auroc(s, err) if 0 < n_err < len(s) else float("nan"),
            "precision_at_k": float(prec_at[n_err - 1]) if n_err else float("nan"),
            "average_precision": _average_precision(s[order], hits, prec_at, n_err),
            "num_selected": n_sel, "num_errors": n_err}


def _average_precision(sorted_s, hits, prec_at, n_err) -> float:
    """sum over distinct score thresholds of (recall step) * precision, ties as one step."""
    if n_err == 0:
        return float("nan")
    last = torch.ones_like(sorted_s, dtype=torch.bool)
    last[:-1] = sorted_s[1:] != sorted_s[:-1]
    rec = hits[last] / n_err
    return float(((rec - torch.cat([rec.new_zeros(1), rec[:-1]])) * prec_at[last]).sum())

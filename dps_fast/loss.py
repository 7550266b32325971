"""DPSLoss: the drop-in nn.Module that owns the posterior bank, wherever the bank lives."""
from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from . import _validate
from .banks import StepConfig, make_bank
from .banks.collective import collective_of
from .functional import posterior_readouts, supcon_loss
from .ops._common import in_backward_recompute
from .prior import prior_eps

CON_POSITIVES = ("hard", "soft", "views")


class DPSLoss(nn.Module):
    """Deep Probabilistic Supervision loss with its posterior bank.

    ``loss = DPSLoss(labels, num_classes)(logits, index)`` updates the bank rows of
    the batch (in training mode) and returns the cross-entropy against the
    posterior-mean targets (docs/method.md). With ``contrastive_weight > 0`` pass
    ``features`` ([V, B, d] projections of the V views) and the loss adds
    ``contrastive_weight * supcon_loss`` with positives from the posterior:
    ``con_positives="hard"`` (same argmax of the posterior, the default), ``"soft"``
    (weights <T_i, T_j>) or ``"views"`` (NT-Xent, other views only).

    ``bank`` says where the rows live (docs/method.md, "Banks"): ``"local"`` (default,
    in place on the module's device), ``"host"`` (pinned host memory; the step runs on
    ``device``), ``"replicated"`` / ``"sharded"`` (across the ranks of a
    ``torch.distributed`` process group; ``"auto"`` picks by size). Every kind runs the
    same fused step and the same policies: in ``eval()`` mode the bank is read, never
    written; every check runs before the first write, on every rank.

    The bank is module state but not a buffer: it is in ``state_dict()`` and moves with
    ``.to(device)``, and DDP's buffer broadcast never touches it. ``bank_dtype`` may be
    float32, bfloat16, float16 or float64; a module cast (``model.half()``,
    ``.to(torch.bfloat16)``) moves the bank but keeps its dtype, in every bank kind (it is
    state, like an optimizer's); :meth:`to_bank_dtype` converts it, checked.
    The prior puts ``c`` on each label and ``eps`` on the other classes; by default ``eps =
    off_label * c / (C - 1)`` with ``off_label = 9e-4`` (eps = 0.01 at C = 10, c = 100), so
    the label keeps 99.9% of the initial target at any C; an explicit ``eps`` wins (a warning
    when its off-label mass exceeds 10% of c). ``top_k=k`` keeps each row as its k largest
    classes plus the mass of the others (docs/method.md §12; every bank kind, float32 values,
    the fused CPU kernel or the reference step so far): read-outs see the implied dense rows. ``tau_e="auto"`` (default):
    the loss sets the evidence temperature itself, starting at 1, once per pass over the bank
    (every N samples its training steps see), to ``max(0.1, 1 - 2 s)``, ``s`` the mean
    label-error score of the rows the pass's steps wrote (a running sum the step keeps; with
    each sample once per pass, ``mean_label_error()`` at the pass's end; docs/method.md §10);
    its state is in ``state_dict``. A float keeps it fixed: ``tau_e=1.0`` is DPS as published.
    ``load_state_dict`` verifies every saved tensor (shapes, dtypes, labels [N] in [0, C),
    values finite and > 0 in the bank dtype) before it writes any, and reports a problem as
    ``nn.Module`` reports a size mismatch (a RuntimeError, strict or not). ``validate=False``
    skips the host-side index checks of the local bank (CUDA graphs); the kernels then skip
    out-of-range rows.
    """

    def __init__(self, labels=None, num_classes: int | None = None, c: float = 100.0,
                 eps: float | None = None, gamma: float = 0.95, tau_e: float | str = "auto",
                 target: str = "posterior", reduction: str = "mean",
                 contrastive_weight: float = 0.0, con_tau: float = 0.1,
                 con_positives: str = "hard", bank_dtype: torch.dtype = torch.float32,
                 prior: torch.Tensor | None = None, backend: str | None = None, device=None,
                 bank: str = "local", validate: bool = True, group=None, timeout_s: float = 120.0,
                 shard_above_bytes: int = 256 * 2 ** 20, off_label: float | None = None,
                 top_k: int | None = None):
        super().__init__()
        self.auto_tau_e = AutoTauE() if tau_e == "auto" else None  # docs/method.md §10
        self.cfg = StepConfig(gamma, 1.0 if tau_e == "auto" else tau_e, target, reduction, backend, bool(validate))
        self._check_contrastive(contrastive_weight, con_positives, reduction)
        self.con_tau = _validate.positive("con_tau", con_tau)
        self.contrastive_weight, self.con_positives = float(contrastive_weight), con_positives
        if prior is None and isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 1:
            eps = prior_eps(num_classes, c, eps, off_label, warn=True)  # docs/method.md §1
        elif eps is None:
            eps = 1e-2  # unused: an explicit prior, or num_classes missing (make_bank says so)
        self.store = make_bank(bank, labels, num_classes, c, eps, bank_dtype, prior, device, group, timeout_s,
                               shard_above_bytes, top_k)
        # the prior's parameters (None for an explicit prior): label read-outs use them to
        # tell the evidence in a row from what is left of the prior (docs/method.md §5.1)
        self.c, self.eps = (None, None) if prior is not None else (float(c), float(eps))
        if self.auto_tau_e is not None:
            self.auto_tau_e.next_at = self.num_samples  # the first adaptation: after one pass

    @staticmethod
    def _check_contrastive(weight, positives, reduction):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"contrastive_weight must be a number >= 0, got {weight!r}")
        if positives not in CON_POSITIVES:
            raise ValueError(f"con_positives must be one of {CON_POSITIVES}, got {positives!r}")
        if weight > 0 and reduction == "none":
            raise ValueError("contrastive_weight > 0 needs reduction 'mean' or 'sum'")

    # ------------------------------------------------------------------ the step
    def forward(self, logits: torch.Tensor, index: torch.Tensor, features: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one batch. ``index``: the samples' ids; ``valid`` (optional, bool [B]):
        False for padding repeats, which get a loss but never update the bank."""
        con = self.contrastive_weight > 0
        check = (lambda: self._check_features(features, logits)) if con else None
        loss, rows = self.store.step(logits, index, valid, self.training, self.cfg, check)
        if con:
            loss = loss + self.contrastive_weight * self._contrastive(features, index, rows)
        if self.auto_tau_e is not None and self.training and not in_backward_recompute():
            self._count_for_auto_tau_e(index, valid, rows)
        return loss

    def _count_for_auto_tau_e(self, index, valid, rows) -> None:
        """tau_e="auto" (docs/method.md §10): adds the batch's label-error scores, read from the
        rows the step just wrote, to a running sum (on the device: no host sync), counts the
        samples seen (the global batch on a distributed bank), and once per pass over the bank
        (every N samples) sets tau_e from the pass's mean score: one small all-reduce."""
        auto = self.auto_tau_e
        auto.add(*self.store.label_share_sum(index, valid, rows))
        auto.seen += self._samples_seen(index, valid)
        if auto.seen >= auto.next_at:
            total = torch.tensor(auto.sums(), dtype=torch.float64, device=self.store.device)
            share_sum, count = collective_of(self, self.world).sum_(total).tolist()
            if count > 0:
                self.tau_e = max(auto.floor, 1.0 - auto.k * (1.0 - share_sum / count))
            auto.share, auto.count = None, 0
            auto.next_at += self.num_samples * ((auto.seen - auto.next_at) // self.num_samples + 1)

    def _samples_seen(self, index, valid) -> int:
        """The step's valid samples: the global batch's on a distributed bank (padding repeats
        are not new samples, so that a pass is an epoch under DistributedSampler's padding)."""
        if hasattr(self.store, "comm"):  # a distributed bank: its begin() agreed on the global count
            return self.store.last_step_samples
        return index.shape[0] if valid is None else int(valid.sum())  # a mask: padding, rare on one process

    def _check_features(self, features, logits):
        if features is None:
            raise ValueError("contrastive_weight > 0: pass features [V, B, d]")
        b = logits.shape[-2]
        _validate.floating("features", features)
        if features.dim() != 3 or features.shape[1] != b or features.shape[2] < 1:
            raise ValueError(f"features must have shape [V, {b}, d] (the logits' batch), got {list(features.shape)}")
        if self.con_positives == "views" and features.shape[0] < 2:
            raise ValueError("con_positives='views' pairs the views of each sample: features need V >= 2")
        _validate.same_device(logits=logits, features=features)

    def _contrastive(self, features, index, rows):
        labels = soft = None
        if self.con_positives != "views":
            with torch.no_grad():
                if rows is None:
                    # an id outside the bank (only reachable with validate=False) already has a NaN
                    # loss and left the bank untouched (docs/method.md §9): any row stands in for it
                    rows = self.store.rows(index.to(torch.int64).clamp(0, self.store.num_samples - 1))
                rows = rows.float()
            if self.con_positives == "hard":
                labels = rows.argmax(1)
            else:
                soft = rows / rows.sum(1, keepdim=True)
        return supcon_loss(features, labels=labels, tau=self.con_tau, soft_targets=soft, backend=self.cfg.backend)

    # ------------------------------------------------------------------ the bank as module state
    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.half()``, ...: the bank follows device moves but keeps its
        dtype, in every bank kind (it is state, like an optimizer's; banks/state.py)."""
        super()._apply(fn, recurse)
        self.store.move(fn)
        return self

    def to_bank_dtype(self, dtype: torch.dtype) -> "DPSLoss":
        """Converts the bank to ``dtype`` (float32, bfloat16, float16 or float64) after the check
        of construction: every value finite and > 0 once converted, else a ValueError and the
        bank unchanged. A collective for the distributed banks (every rank calls it)."""
        self.store.convert(dtype)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        _validate.raise_deferred()  # an earlier step's failed device-side index check
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.store.state().items():
            destination[prefix + k] = v
        if self.auto_tau_e is not None:  # float64 holds the counts exactly up to 2**53 samples
            auto, rank = self.auto_tau_e, getattr(self.store, "rank", 0)  # the sums are this rank's part
            destination[prefix + "tau_e_auto"] = torch.tensor([self.tau_e, auto.seen, auto.next_at, *auto.sums(),
                                                               rank, self.world], dtype=torch.float64)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # the bank verifies every tensor before it writes any; a problem goes to ``errors``, so
        # load_state_dict raises it (strict or not) and the bank and labels stay as they were.
        # As for any module, absent keys are reported as missing (load_state_dict always passes
        # strict=True here and applies the user's strict itself) and the present ones load;
        # given_labels may be absent (checkpoints of older versions): the labels are then kept;
        # labels without the rows are refused (they would mix two runs' states; banks/state.py).
        keys = self.store.state().keys()
        mine = {k: state_dict.pop(prefix + k) for k in keys if prefix + k in state_dict}
        if strict:
            optional = getattr(self.store, "optional_state", ("given_labels",))
            missing.extend(prefix + k for k in keys if k not in mine and k not in optional)
        self.store.load_state(mine, errors)  # also when empty: a distributed bank's load is a collective
        auto = state_dict.pop(prefix + "tau_e_auto", None)
        if auto is not None and self.auto_tau_e is not None and not errors:
            mine = len(auto) < 7 or (int(auto[5]), int(auto[6])) == (getattr(self.store, "rank", 0), self.world)
            # another rank's sums (a replica saved on rank 0, loaded everywhere) would count W times
            self.auto_tau_e.load(self, auto[:5] if mine else torch.cat([auto[:3], auto.new_zeros(2)]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    # ------------------------------------------------------------------ read-outs
    @property
    def bank_kind(self) -> str:
        """Where the bank's rows live: "local", "host", "replicated" or "sharded" (the ``bank``
        argument, "auto" resolved). Names, as the docs use them: the *bank kind* is this
        string, the *bank* the object that holds the rows (``self.store``, a
        :class:`dps_fast.banks.Bank`), and :attr:`alpha` the rows themselves."""
        return self.store.kind

    @property
    def alpha(self) -> torch.Tensor:
        """This process's bank rows (all N rows, except in a sharded bank)."""
        return self.store.storage

    @property
    def given_labels(self) -> torch.Tensor:
        """The given labels of all N samples."""
        return self.store.labels

    @property
    def num_samples(self) -> int:
        """N, the number of training samples (bank rows)."""
        return self.store.num_samples

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return self.store.num_classes

    @property
    def gamma(self) -> float:
        """The evidence discount gamma of the step (docs/method.md §2)."""
        return self.cfg.gamma

    @property
    def tau_e(self) -> float:
        """The evidence temperature of the following steps; settable between steps."""
        return self.cfg.tau_e

    @tau_e.setter
    def tau_e(self, value: float) -> None:
        """A new evidence temperature for the following steps (checked like the constructor's),
        e.g. a schedule set at each epoch start (docs/results.md §5). Every rank must set the same."""
        self.cfg = dataclasses.replace(self.cfg, tau_e=_validate.evidence_temperature(value))

    @torch.no_grad()
    def mean_label_error(self, chunk_rows: int = 65536) -> float:
        """The mean over all N samples of the label-error score 1 - t_i[y_i] (docs/method.md §5),
        chunk by chunk; a collective (one all-reduce) for the distributed banks."""
        total, labels = None, self.given_labels  # (iter_rows raises a pending failed index check)
        for ids, rows in self.iter_rows(chunk_rows):
            # the row sums accumulate in float64 without a float64 copy of the chunk (0.5 GB at
            # 65,536 x 1000); the label's entry is exact in float64 whatever the bank dtype
            lab = labels[ids.to(labels.device)].to(rows.device, torch.int64)
            a_y = rows.gather(1, lab[:, None])[:, 0].double()
            part = torch.stack([(1 - a_y / rows.sum(1, dtype=torch.float64)).sum(), a_y.new_tensor(len(ids))])
            total = part if total is None else total + part
        if total is None:
            total = torch.zeros(2, dtype=torch.float64, device=self.store.device)
        total = collective_of(self, self.world).sum_(total)
        return float(total[0] / total[1])

    def adapt_tau_e(self, k: float = 2.0, floor: float = 0.1) -> float:
        """The noise-adaptive evidence temperature of docs/results.md §5: sets
        ``tau_e = max(floor, 1 - k * mean_label_error())`` and returns it. Call it at the start
        of each epoch (on every rank: it is a collective for the distributed banks). ``k = 2``
        took the ResNet's sym40 ECE from 16.2% to 7.1%; not the default (see there why)."""
        k, floor = _validate.positive("k", k), _validate.evidence_temperature(floor)
        self.tau_e = max(floor, 1.0 - k * self.mean_label_error())
        return self.tau_e

    def tau_e_state(self) -> torch.Tensor:
        """tau_e="auto"'s state for a checkpoint written by one rank: [tau_e, samples seen, next
        adaptation, this pass's label-share sum, its count] with the sums over every rank (a
        collective for the distributed banks: call it on every rank). ``state_dict`` keeps each
        rank's own sums instead, for per-rank state dicts. Empty with a fixed tau_e."""
        if self.auto_tau_e is None:
            return torch.zeros(0, dtype=torch.float64)
        auto = self.auto_tau_e
        sums = torch.tensor(auto.sums(), dtype=torch.float64, device=self.store.device)
        sums = collective_of(self, self.world).sum_(sums).cpu()
        return torch.cat([torch.tensor([self.tau_e, auto.seen, auto.next_at], dtype=torch.float64), sums])

    def load_tau_e_state(self, saved: torch.Tensor) -> None:
        """Restores :meth:`tau_e_state` on every rank (rank 0 takes the pass's sums)."""
        if self.auto_tau_e is not None and saved.numel():
            first = getattr(self.store, "rank", 0) == 0
            self.auto_tau_e.load(self, saved if first else torch.cat([saved[:3], saved.new_zeros(2)]))

    def iter_rows(self, chunk_rows: int = 65536):
        """(global ids, rows) of the rows this process owns, a chunk at a time; across the
        ranks of a distributed bank every row is owned by exactly one rank."""
        _validate.raise_deferred()  # an earlier step's failed device-side index check
        return self.store.iter_rows(chunk_rows)

    @property
    def world(self) -> int:
        """The number of processes sharing the bank (1 unless distributed)."""
        return getattr(self.store, "world", 1)

    @property
    def group(self):
        """The bank's process group (None unless distributed)."""
        comm = getattr(self.store, "comm", None)
        return comm.group if comm is not None else None

    def full_bank(self) -> torch.Tensor:
        """The whole bank [N, C] on this process (a collective of N*C elements for a sharded bank)."""
        _validate.raise_deferred()  # an earlier step's failed device-side index check
        return self.store.full()

    @torch.no_grad()
    def targets(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior-mean targets (float32) of rows ``index`` (global ids or a bool mask [N],
        :func:`dps_fast._validate.readout_index`; a collective for a sharded bank), or of all
        rows this process holds."""
        _validate.raise_deferred()  # an earlier step's failed device-side index check
        a = (self.alpha if index is None else self.store.rows(_validate.readout_index(index, self.num_samples))).float()
        return a / a.sum(1, keepdim=True)

    @torch.no_grad()
    def posterior(self, index: torch.Tensor | None = None, chunk_rows: int | None = None) -> dict:
        """docs/method.md read-outs (mean, alpha0, entropy, expected_entropy,
        mutual_information, label_error = 1 - t[given label]) of rows ``index`` (ids or a bool
        mask [N], as :meth:`targets`) or of all rows this process holds, in chunks of bounded
        scratch memory (:func:`dps_fast.functional.posterior_readouts`; ``chunk_rows`` caps them)."""
        _validate.raise_deferred()  # an earlier step's failed device-side index check
        idx = self.store.held_ids() if index is None else _validate.readout_index(index, self.num_samples)
        rows = self.alpha if index is None else self.store.rows(idx)
        lab = self.store.labels[idx.to(self.store.labels.device)]
        return posterior_readouts(rows, lab, chunk_rows=chunk_rows)

    def topk_error(self) -> dict:
        """For a top-k bank (``top_k=k``): how far its targets may be from a dense bank's, the
        per-row bound on their total-variation distance (docs/method.md §12), its mean and max."""
        _validate.raise_deferred()  # an earlier step's failed device-side index check
        if not hasattr(self.store, "error"):
            raise ValueError("topk_error: this loss keeps a dense bank (create it with top_k=k)")
        return self.store.error()

    def find_label_issues(self, **kw):
        """Likely label errors, ranked (:func:`dps_fast.label_issues.find_label_issues`)."""
        from .label_issues import find_label_issues

        return find_label_issues(self, **kw)

    def export_soft_labels(self, path: str, top_k: int | None = None, dtype: torch.dtype = torch.float16,
                           epoch: int | None = None):
        """Writes the posterior means as soft labels (safetensors; dense, or top-k plus the
        remainder): :func:`dps_fast.soft_labels.export_soft_labels`."""
        _validate.raise_deferred()  # an earlier step's failed device-side index check
        from .soft_labels import export_soft_labels

        return export_soft_labels(self, path, top_k, dtype, epoch=epoch)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"N={self.num_samples}, C={self.num_classes}, bank={self.store.kind}, gamma={c.gamma}, "
                f"tau_e={c.tau_e}, target={c.target!r}, bank_dtype={self.store.dtype}, "
                f"contrastive_weight={self.contrastive_weight}")


@dataclasses.dataclass
class AutoTauE:
    """The state of tau_e="auto" (docs/method.md §10): the noise-adaptive evidence
    temperature tau_e = max(floor, 1 - k * mean label-error score), set once per pass over
    the bank, counted in samples seen by training steps (eval steps do not count)."""
    k: float = 2.0
    floor: float = 0.1
    seen: int = 0
    next_at: int = 0  # samples seen at the next adaptation (N, 2N, ...; set by DPSLoss)
    share: torch.Tensor | None = None  # this pass so far: the sum of the label's share t_i[y_i] (float64)
    count: int | torch.Tensor = 0      # ... over this many samples (a tensor once a valid mask was given)

    def add(self, share_sum: torch.Tensor, count) -> None:
        """Adds one batch (on the device: no host sync)."""
        self.share = share_sum.double() if self.share is None else self.share.to(share_sum.device) + share_sum
        self.count = self.count + count

    def sums(self) -> list[float]:
        """[share sum, count] of this pass so far, as Python floats (reads the device)."""
        return [0.0 if self.share is None else float(self.share), float(self.count)]

    def load(self, loss: "DPSLoss", saved: torch.Tensor) -> None:
        """Restores the state that ``DPSLoss.state_dict`` saved (a checkpoint of an older
        version, without this pass's sums, restarts them at zero)."""
        values = [float(v) for v in saved]
        loss.tau_e, self.seen, self.next_at = values[0], int(values[1]), int(values[2])
        self.share = torch.tensor(values[3], dtype=torch.float64) if len(values) >= 5 else None
        self.count = int(values[4]) if len(values) >= 5 else 0


class HostDPSLoss(DPSLoss):
    """``DPSLoss(bank="host")``: one process, the bank in pinned host memory, the step on
    ``device`` (docs/method.md, "Banks"). ``prefetch(next_index)`` gathers the next batch's
    rows early; ``flush()`` writes the pending write-back."""

    def __init__(self, labels=None, num_classes=None, **kw):
        super().__init__(labels, num_classes, bank="host", **kw)

    def prefetch(self, index: torch.Tensor) -> None:
        """Gathers the rows of the next batch's ``index`` to the device ahead of its step."""
        self.store.prefetch(index)

    def flush(self) -> None:
        """Writes the pending write-back of the last step into the host bank."""
        self.store.flush()

    @property
    def bank(self) -> torch.Tensor:
        """Deprecated: :attr:`alpha` (the whole bank [N, C] in pinned host memory)."""
        warnings.warn("HostDPSLoss.bank is deprecated: use .alpha (the rows)", DeprecationWarning, stacklevel=2)
        return self.alpha

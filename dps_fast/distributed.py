"""DPS under torch.distributed: one consistent posterior bank across ranks.

Two modes (``DistributedDPSLoss(mode=...)``):

- ``"replicated"``: every rank holds the whole bank [N, C]. Each step the ranks
  all-gather their (index, evidence, valid) triples and every rank applies all of
  them in rank order, so the replicas stay identical. Memory N*C per rank; traffic
  per step: each rank receives the evidence of the global batch.
- ``"sharded"`` (default for large banks): rank r owns the rows with
  ``index % world == r`` (stored densely at ``index // world``). Each step routes
  every (index, evidence) pair to its owner with ``all_to_all_single``; the owner
  applies the update and sends back the target rows the batch needs. Memory
  N*C/world per rank; traffic per step O(B*C) per rank.

Both give the same bank and the same losses as one process that sees the global
batch (the union of the ranks' batches) in one call: the update of a sample only
depends on its own row. The step is: evidence ``e = mean_v softmax(z_v / tau_e)``
(no gradient), ``alpha <- gamma * alpha + e`` for the valid rows, target = the
normalised posterior (or prior), loss = the fused soft-target cross-entropy of every
view against it.

``valid`` marks the real samples of a batch. ``DistributedSampler`` pads the epoch
by repeating samples so every rank gets as many; pass ``valid=False`` for those (see
``padding_mask``): they get a target (the posterior preview, not stored) but no
update, so every sample is updated exactly once per epoch.

The bank is not a module buffer: DDP's buffer broadcast can never overwrite it,
even if this module ends up inside a DDP-wrapped model. ``state_dict()`` holds this
rank's rows; ``save_bank`` / ``load_bank`` write and read one file per rank and
re-shard when the world size changes. Every collective has a timeout; invalid
input on any rank raises on every rank (after one small all-reduce), never hangs.
"""
from __future__ import annotations

import datetime
import glob
import os

import torch
import torch.distributed as dist
from torch import nn

from . import _validate as V
from .functional import init_prior, soft_cross_entropy

MODES = ("replicated", "sharded")
# torch >= 2.13 renames all_gather_into_tensor (2.11 has only the old name)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_ERR_NONE, _ERR_RANGE, _ERR_DUP = 0, 1, 2


def _require_dist():
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("dps_fast.distributed: call torch.distributed.init_process_group() before creating "
                           "a DistributedDPSLoss (the bank is laid out for the process group's world size)")


def padding_mask(dataset_len: int, world: int, rank: int, positions: torch.Tensor) -> torch.Tensor:
    """For ``DistributedSampler(drop_last=False)``: rank ``rank`` takes positions
    ``rank, rank + world, ...`` of the padded epoch list, whose entries at positions
    ``>= dataset_len`` repeat earlier samples. ``positions`` are the local positions
    (0, 1, ...) of the batch within this rank's epoch; returns True for real samples."""
    return positions * world + rank < dataset_len


class DistributedDPSLoss(nn.Module):
    """DPS loss with a bank kept consistent across the ranks of a process group.

    Args mirror :class:`dps_fast.DPSLoss`; ``mode`` is "replicated", "sharded" or
    "auto" (sharded when the replicated bank would exceed ``shard_above_bytes``,
    default 256 MB), ``timeout_s`` bounds every collective. Call with
    ``loss(logits, index, valid=None)``; ``index`` holds global sample ids.
    """

    def __init__(self, labels=None, num_classes: int | None = None, c: float = 100.0, eps: float = 1e-2,
                 gamma: float = 0.95, tau_e: float = 1.0, target: str = "posterior", mode: str = "auto",
                 bank_dtype: torch.dtype = torch.float32, prior: torch.Tensor | None = None, device=None,
                 group=None, timeout_s: float = 120.0, shard_above_bytes: int = 256 * 2 ** 20, backend=None):
        super().__init__()
        _require_dist()
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.gamma = V.gamma_value(gamma)
        self.tau_e = V.positive("tau_e", tau_e)
        if target not in V.TARGETS:
            raise ValueError(f"target must be one of {V.TARGETS}, got {target!r}")
        self.target, self.backend = target, backend
        self.timeout = datetime.timedelta(seconds=float(timeout_s))
        full = (prior.detach().to(bank_dtype) if prior is not None
                else init_prior(labels, num_classes, c, eps, dtype=bank_dtype))
        self.num_samples, self.num_classes = full.shape
        if mode == "auto":
            mode = "sharded" if full.numel() * full.element_size() > shard_above_bytes and self.world > 1 \
                else "replicated"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or 'auto', got {mode!r}")
        self.mode = mode
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self._bank = self._local_rows(full).to(dev).contiguous()
        self.last_targets = None
        self.comm_bytes = 0  # bytes delivered into this rank's receive buffers by the collectives

    # ------------------------------------------------------------------ layout
    def _local_rows(self, full: torch.Tensor) -> torch.Tensor:
        return full.clone() if self.mode == "replicated" else full[self.rank::self.world].clone()

    @property
    def bank(self) -> torch.Tensor:
        """This rank's rows: the whole bank (replicated) or rows rank, rank+W, ... (sharded)."""
        return self._bank

    def _apply(self, fn, recurse=True):  # .to() / .cuda() move the bank, though it is not a buffer
        super()._apply(fn, recurse)
        self._bank = fn(self._bank)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "bank"] = self._bank
        destination[prefix + "bank_layout"] = torch.tensor([self.world, self.rank, self.num_samples,
                                                            self.num_classes, MODES.index(self.mode)])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key, lkey = prefix + "bank", prefix + "bank_layout"
        if key in state_dict:
            layout = state_dict[lkey].tolist() if lkey in state_dict else None
            want = [self.world, self.rank, self.num_samples, self.num_classes, MODES.index(self.mode)]
            if layout is not None and layout != want:
                errors.append(f"bank layout {layout} (world, rank, N, C, mode) does not match this process's "
                              f"{want}; use dps_fast.distributed.load_bank to re-shard")
            else:
                self._bank.copy_(state_dict[key])
        elif strict:
            missing.append(key)
        for k in (key, lkey):
            state_dict.pop(k, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    # ------------------------------------------------------------------ collectives
    def _wait(self, work, *received: torch.Tensor):
        if work is not None:
            work.wait(self.timeout)
        for t in received:
            self.comm_bytes += (t.numel() * t.element_size()) if isinstance(t, torch.Tensor) else \
                sum(x.numel() * x.element_size() for x in t)

    def _all_gather_sizes(self, n: int, device) -> list[int]:
        t = torch.tensor([n], dtype=torch.int64, device=device)
        out = [torch.zeros_like(t) for _ in range(self.world)]
        self._wait(dist.all_gather(out, t, group=self.group, async_op=True), out)
        return [int(x) for x in out]

    def _check_all_ranks(self, code: int, detail: int, device):
        t = torch.tensor([code, detail if code else -1, self.rank if code else -1], dtype=torch.int64, device=device)
        out = [torch.zeros_like(t) for _ in range(self.world)]
        self._wait(dist.all_gather(out, t, group=self.group, async_op=True), out)
        for row in out:
            c, d, r = (int(v) for v in row)
            if c == _ERR_RANGE:
                raise IndexError(f"index {d} on rank {r} is out of range for a bank of {self.num_samples} rows")
            if c == _ERR_DUP:
                raise ValueError(f"index contains duplicate id {d} (rank {r}); ids of one global step must be "
                                 f"distinct among valid samples")

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def _evidence(self, logits: torch.Tensor) -> torch.Tensor:
        z = logits.detach().float()
        z = z if z.dim() == 3 else z.unsqueeze(0)
        return torch.softmax(z / self.tau_e, dim=-1).mean(0)

    def _validate(self, logits, index, valid):
        v, b, c = V.logits_tensor(logits)
        V.index_tensor(index, b)
        if c != self.num_classes:
            raise ValueError(f"the bank has {self.num_classes} classes but the logits have {c}")
        if valid is None:
            valid = torch.ones(b, dtype=torch.bool, device=index.device)
        elif valid.dtype != torch.bool or valid.shape != (b,):
            raise ValueError(f"valid must be a bool tensor of shape [{b}]")
        if dist.get_world_size(self.group) != self.world:
            raise RuntimeError(f"world size changed from {self.world} to {dist.get_world_size(self.group)}: "
                               f"re-create the loss, or save_bank / load_bank to re-shard")
        idx = index.detach().to(torch.int64)
        code, detail = _ERR_NONE, 0
        if b:
            bad = (idx < 0) | (idx >= self.num_samples)
            if bool(bad.any()):
                code, detail = _ERR_RANGE, int(idx[bad][0])
            else:
                s = torch.sort(idx[valid.to(idx.device)]).values
                dup = s[1:] == s[:-1]
                if bool(dup.any()):
                    code, detail = _ERR_DUP, int(s[1:][dup][0])
        return idx, valid, code, detail

    @torch.no_grad()
    def _update_rows(self, rows: torch.Tensor, e: torch.Tensor, valid: torch.Tensor):
        """Given bank rows (local storage positions), evidence and validity: update the
        valid rows in place (in order) and return the target base rows (float32)."""
        a_old = self._bank[rows].float()
        a_new = self.gamma * a_old + e
        self._bank[rows[valid]] = a_new[valid].to(self._bank.dtype)
        return a_new if self.target == "posterior" else a_old

    def forward(self, logits: torch.Tensor, index: torch.Tensor, valid: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        idx, valid, code, detail = self._validate(logits, index, valid)
        dev = self._bank.device
        e = self._evidence(logits).to(dev)
        idx, valid = idx.to(dev), valid.to(dev)
        if self.mode == "replicated":
            base = self._step_replicated(idx, e, valid, code, detail)
        else:
            base = self._step_sharded(idx, e, valid, code, detail)
        t = (base / base.sum(1, keepdim=True)).to(logits.device)
        self.last_targets = t
        z = logits if logits.dim() == 3 else logits.unsqueeze(0)
        nv = z.shape[0]
        loss = soft_cross_entropy(z.reshape(-1, z.shape[-1]), t.repeat(nv, 1), reduction=reduction,
                                  backend=self.backend)
        if reduction == "none":
            loss = loss.view(nv, -1) if logits.dim() == 3 else loss
        return loss

    def _step_replicated(self, idx, e, valid, code, detail):
        dev = self._bank.device
        sizes = self._all_gather_sizes(idx.numel(), dev)
        self._check_all_ranks(code, detail, dev)
        bmax = max(sizes)
        pad = bmax - idx.numel()
        pidx = torch.cat([idx, idx.new_zeros(pad)])
        pe = torch.cat([e, e.new_zeros(pad, e.shape[1])])
        pv = torch.cat([valid, valid.new_zeros(pad)]).to(torch.uint8)
        g_idx = torch.empty(self.world * bmax, dtype=torch.int64, device=dev)
        g_e = torch.empty(self.world * bmax, e.shape[1], dtype=e.dtype, device=dev)
        g_v = torch.empty(self.world * bmax, dtype=torch.uint8, device=dev)
        works = [_all_gather_flat(g_idx, pidx, group=self.group, async_op=True),
                 _all_gather_flat(g_e, pe, group=self.group, async_op=True),
                 _all_gather_flat(g_v, pv, group=self.group, async_op=True)]
        for w, buf in zip(works, (g_idx, g_e, g_v)):
            self._wait(w, buf)
        real = torch.cat([torch.arange(r * bmax, r * bmax + sizes[r], device=dev) for r in range(self.world)])
        g_idx, g_e, g_v = g_idx[real], g_e[real], g_v[real].bool()
        # cross-rank duplicates among valid samples would make the result order-dependent
        s = torch.sort(g_idx[g_v]).values
        dup = s[1:] == s[:-1]
        if bool(dup.any()):
            raise ValueError(f"index contains duplicate id {int(s[1:][dup][0])} across ranks in one step; "
                             f"ids of one global step must be distinct among valid samples")
        base_all = self._update_rows(g_idx, g_e, g_v)
        start = sum(sizes[:self.rank])
        return base_all[start:start + idx.numel()]

    def _step_sharded(self, idx, e, valid, code, detail):
        dev, w = self._bank.device, self.world
        self._check_all_ranks(code, detail, dev)
        owner = idx % w
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=w)
        recv_counts = torch.empty_like(send_counts)
        self._wait(dist.all_to_all_single(recv_counts, send_counts, group=self.group, async_op=True), recv_counts)
        sc, rc = send_counts.tolist(), recv_counts.tolist()
        c = e.shape[1]
        r_idx = torch.empty(sum(rc), dtype=torch.int64, device=dev)
        r_e = torch.empty(sum(rc), c, dtype=e.dtype, device=dev)
        r_v = torch.empty(sum(rc), dtype=torch.uint8, device=dev)
        works = [dist.all_to_all_single(r_idx, idx[order].contiguous(), rc, sc, group=self.group, async_op=True),
                 dist.all_to_all_single(r_e, e[order].contiguous(), rc, sc, group=self.group, async_op=True),
                 dist.all_to_all_single(r_v, valid[order].to(torch.uint8).contiguous(), rc, sc, group=self.group,
                                        async_op=True)]
        for wk, buf in zip(works, (r_idx, r_e, r_v)):
            self._wait(wk, buf)
        r_valid = r_v.bool()
        s = torch.sort(r_idx[r_valid]).values
        dup = s[1:] == s[:-1]
        bad = torch.tensor([int(s[1:][dup][0]) if bool(dup.any()) else -1], device=dev)
        flags = [torch.zeros_like(bad) for _ in range(w)]
        self._wait(dist.all_gather(flags, bad, group=self.group, async_op=True), flags)
        for f in flags:
            if int(f) >= 0:
                raise ValueError(f"index contains duplicate id {int(f)} across ranks in one step; ids of one "
                                 f"global step must be distinct among valid samples")
        base_recv = self._update_rows(r_idx // w, r_e, r_valid)
        back = torch.empty(idx.numel(), c, dtype=base_recv.dtype, device=dev)
        self._wait(dist.all_to_all_single(back, base_recv.contiguous(), sc, rc, group=self.group, async_op=True), back)
        base = torch.empty_like(back)
        base[order] = back
        return base

    # ------------------------------------------------------------------ read-outs
    @torch.no_grad()
    def full_bank(self) -> torch.Tensor:
        """The whole bank [N, C] on every rank (a collective in sharded mode)."""
        if self.mode == "replicated":
            return self._bank.clone()
        n, w = self.num_samples, self.world
        rows = -(-n // w)
        pad = torch.zeros(rows, self.num_classes, dtype=self._bank.dtype, device=self._bank.device)
        pad[: self._bank.shape[0]] = self._bank
        out = torch.empty(w * rows, self.num_classes, dtype=pad.dtype, device=pad.device)
        self._wait(_all_gather_flat(out, pad, group=self.group, async_op=True))
        full = torch.empty(n, self.num_classes, dtype=pad.dtype, device=pad.device)
        for r in range(w):
            cnt = len(range(r, n, w))
            full[r::w] = out[r * rows: r * rows + cnt]
        return full

    def extra_repr(self):
        return (f"mode={self.mode!r}, world={self.world}, rank={self.rank}, N={self.num_samples}, "
                f"C={self.num_classes}, local_rows={self._bank.shape[0]}, dtype={self._bank.dtype}")


# ---------------------------------------------------------------------- checkpoints
def save_bank(loss: DistributedDPSLoss, folder: str) -> str:
    """Writes this rank's rows to ``folder/bank-rank{r}-of-{W}.pt`` (atomically)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"bank-rank{loss.rank}-of-{loss.world}.pt")
    tmp = path + ".tmp"
    torch.save({"bank": loss.bank.cpu(), "world": loss.world, "rank": loss.rank, "mode": loss.mode,
                "num_samples": loss.num_samples, "num_classes": loss.num_classes}, tmp)
    os.replace(tmp, path)
    return path


def read_full_bank(folder: str) -> torch.Tensor:
    """Reassembles the whole bank from the per-rank files of one save (any world size)."""
    files = sorted(glob.glob(os.path.join(folder, "bank-rank*-of-*.pt")))
    if not files:
        raise FileNotFoundError(f"no bank-rank*-of-*.pt files in {folder}")
    parts = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    worlds = {p["world"] for p in parts}
    if len(worlds) != 1 or len(parts) != parts[0]["world"]:
        raise ValueError(f"{folder} holds an incomplete or mixed save: files {files}")
    p0 = parts[0]
    if p0["mode"] == "replicated":
        return p0["bank"]
    full = torch.empty(p0["num_samples"], p0["num_classes"], dtype=p0["bank"].dtype)
    for p in parts:
        full[p["rank"]::p["world"]] = p["bank"]
    return full


def load_bank(loss: DistributedDPSLoss, folder: str) -> None:
    """Loads a bank saved with any world size into ``loss`` (re-sharding as needed)."""
    full = read_full_bank(folder)
    if tuple(full.shape) != (loss.num_samples, loss.num_classes):
        raise ValueError(f"saved bank has shape {tuple(full.shape)}, this loss expects "
                         f"({loss.num_samples}, {loss.num_classes})")
    loss.bank.copy_(loss._local_rows(full.to(loss.bank.dtype)).to(loss.bank.device))


# ---------------------------------------------------------------------- byte model
def traffic_model(n: int, c: int, b: int, world: int, bytes_per: int = 4) -> dict:
    """Per-rank bank memory, and bytes delivered into one rank's receive buffers per
    step (its own share included, small control messages left out), replicated vs
    sharded, for a local batch of b samples: an index is 8 bytes, an evidence or
    target row c * bytes_per, a valid flag 1 byte. Sharded assumes the batch's ids
    spread evenly over the owners (as random sampling gives)."""
    row = c * bytes_per
    return {
        "world": world,
        "replicated_bank_bytes": n * row,
        "sharded_bank_bytes": -(-n // world) * row,
        # all-gather of (index, evidence, valid) from every rank
        "replicated_step_bytes": world * b * (8 + row + 1),
        # all-to-all of (index, evidence, valid) to the owners, then the target rows back
        "sharded_step_bytes": b * (8 + row + 1) + b * row,
    }


# ---------------------------------------------------------------------- host-memory bank
class HostDPSLoss(nn.Module):
    """Single-process DPS with the bank in (pinned) host memory and the model on GPU.

    For banks that do not fit next to the model on the device (ImageNet-21k...). Each
    step gathers the batch's rows on the host and copies them to the device; the
    updated rows go back with a non-blocking copy that overlaps the backward pass and
    are scattered into the bank at the start of the next step (or at ``flush()``).
    ``prefetch(next_index)`` starts the next batch's gather early; rows that the
    pending write-back touches are re-read, so a prefetch is never stale.

    Same maths as :func:`dps_fast.dps_cross_entropy` (evidence, update, posterior /
    prior target, fused soft-target cross-entropy per view).
    """

    def __init__(self, labels=None, num_classes=None, c=100.0, eps=1e-2, gamma=0.95, tau_e=1.0,
                 target="posterior", bank_dtype=torch.float32, prior=None, device=None, backend=None):
        super().__init__()
        self.gamma = V.gamma_value(gamma)
        self.tau_e = V.positive("tau_e", tau_e)
        if target not in V.TARGETS:
            raise ValueError(f"target must be one of {V.TARGETS}, got {target!r}")
        self.target, self.backend = target, backend
        bank = (prior.detach().to(bank_dtype).cpu().clone() if prior is not None
                else init_prior(labels, num_classes, c, eps, dtype=bank_dtype))
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.pinned = self.device.type == "cuda"
        self._bank = bank.pin_memory() if self.pinned else bank
        self.num_samples, self.num_classes = bank.shape
        self._pending = None   # (index_cpu, host buffer, event)
        self._prefetched = None  # (index_cpu, device rows)
        self.last_targets = None

    @property
    def bank(self):
        self.flush()
        return self._bank

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "bank"] = self.bank

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "bank"
        if key in state_dict:
            self.flush()
            self._bank.copy_(state_dict.pop(key))
        elif strict:
            missing.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def flush(self):
        """Scatters the pending write-back into the host bank."""
        if self._pending is not None:
            idx, buf, ev = self._pending
            if ev is not None:
                ev.synchronize()
            self._bank.index_copy_(0, idx, buf)
            self._pending = None

    def _gather(self, idx_cpu):
        rows = self._bank.index_select(0, idx_cpu)
        if self.pinned:
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)

    def prefetch(self, index: torch.Tensor):
        idx = index.detach().cpu().to(torch.int64)
        V.index_values(idx, self.num_samples)
        self._prefetched = (idx, self._gather(idx))

    def forward(self, logits, index, reduction="mean"):
        v, b, c = V.logits_tensor(logits)
        V.index_tensor(index, b)
        if c != self.num_classes:
            raise ValueError(f"alpha has {self.num_classes} classes but the logits have {c}")
        idx = index.detach().cpu().to(torch.int64)
        V.index_values(idx, self.num_samples)
        pending_idx = self._pending[0] if self._pending is not None else None
        self.flush()
        if self._prefetched is not None and torch.equal(self._prefetched[0], idx):
            rows = self._prefetched[1]
            if pending_idx is not None:
                stale = torch.isin(idx, pending_idx)
                if bool(stale.any()):
                    rows = rows.clone()
                    rows[stale.to(rows.device)] = self._gather(idx[stale])
        else:
            rows = self._gather(idx)
        self._prefetched = None
        with torch.no_grad():
            z = logits.detach().float()
            z = z if z.dim() == 3 else z.unsqueeze(0)
            e = torch.softmax(z / self.tau_e, -1).mean(0)
            bad = ~torch.isfinite(z).all(-1).all(0)
            a_old = rows.float()
            a_new = torch.where(bad[:, None], a_old, self.gamma * a_old + e)
            base = a_new if self.target == "posterior" else a_old
            t = base / base.sum(1, keepdim=True)
            self.last_targets = t
            if self.training:
                buf = a_new.to(self._bank.dtype).to("cpu", non_blocking=self.pinned)
                ev = None
                if self.pinned:
                    ev = torch.cuda.Event()
                    ev.record()
                self._pending = (idx, buf, ev)
        zz = logits if logits.dim() == 3 else logits.unsqueeze(0)
        loss = soft_cross_entropy(zz.reshape(-1, c), t.repeat(zz.shape[0], 1), reduction=reduction,
                                  backend=self.backend)
        if reduction == "none":
            loss = loss.view(zz.shape[0], -1) if logits.dim() == 3 else loss
        return loss

"""Where the DPS posterior rows live: one module per bank kind, one shared base.

Every kind runs the one fused step (:mod:`dps_fast.functional`); a kind only moves rows
to it and back (docs/method.md, "Banks").

- ``local``: one process, the rows in place on the training device;
- ``host``: one process, the rows in pinned host memory, the step on the GPU;
- ``replicated``: every rank of a process group holds all rows;
- ``sharded``: rank r holds the rows ``id % world == r``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _validate
from ..prior import init_prior
from .base import Bank, StepConfig, StepPlan
from .dist_base import DistributedBank, padding_mask
from .host import HostBank
from .local import LocalBank
from .replicated import ReplicatedBank
from .sharded import ShardedBank

KINDS = ("local", "host", "replicated", "sharded")


def given_labels(labels, prior) -> torch.Tensor:
    """The given label of each row: the labels (or the argmax of soft labels / of the prior)."""
    if labels is None:
        return prior.argmax(1).to(torch.int64)
    lab = torch.as_tensor(labels)
    return (lab.argmax(1) if lab.is_floating_point() else lab).to(torch.int64)


def prior_rows(labels, num_classes, c, eps, dtype, prior, rows=slice(None), device=None,
               pin: bool = False) -> torch.Tensor:
    """The prior of the rows ``rows`` only (a sharded bank never builds the others), built on
    ``device`` (default: the labels' or prior's) in memory for the result plus one block of
    rows (``pin``: pinned host memory, for a host bank stepping on a GPU)."""
    if prior is not None:
        _validate.floating("prior", prior)
        if prior.dim() != 2:
            raise ValueError(f"prior must be a tensor [N, C], got {list(prior.shape)}")
        src = prior.detach()[rows]
        _validate.bank_values_as(src, dtype, "prior")  # as stored: 1e-8 is 0 in float16, 1e5 is inf
        dev = src.device if device is None else device
        return torch.empty(src.shape, dtype=dtype, device=dev, pin_memory=pin).copy_(src)
    if labels is None or num_classes is None:
        raise ValueError("give labels and num_classes, or an explicit prior")
    lab = torch.as_tensor(labels)
    return init_prior(lab[rows], num_classes, c, eps, dtype=dtype, device=device, pin_memory=pin)


def resolve_kind(kind: str, num_samples: int, num_classes: int, dtype, shard_above_bytes: int) -> str:
    if kind == "auto":
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return "local"
        big = num_samples * num_classes * torch.empty(0, dtype=dtype).element_size() > shard_above_bytes
        return "sharded" if big else "replicated"
    if kind not in KINDS:
        raise ValueError(f"bank must be one of {KINDS} or 'auto', got {kind!r}")
    return kind


def make_topk_bank(kind, labels, num_classes, k, c, eps, dtype, prior, device, group=None,
                   timeout_s=120.0) -> Bank:
    """A top-k bank (docs/method.md §12) of any kind: one process (``"local"``, or ``"host"``:
    the rows in host memory), or over a process group (``"replicated"``, ``"sharded"``;
    ``"auto"`` picks replicated under an initialised group), from labels; values in ``dtype``
    (float32, bfloat16 or float16; rest and bound float32, the step in float32)."""
    from .. import topk
    from .topk_local import LocalTopKBank, id_dtype

    if kind not in ("local", "host", "replicated", "sharded", "auto"):
        raise ValueError(f"top_k: bank must be 'local', 'host', 'replicated', 'sharded' or 'auto', got {kind!r}")
    if prior is not None or labels is None or num_classes is None:
        raise ValueError("top_k: build the bank from labels and num_classes (an explicit prior is dense)")
    topk.check_k(k, num_classes)
    topk.check_values_dtype(dtype, c, eps)
    lab = given_labels(labels, None)
    if kind == "sharded":  # only this rank's rows are ever built
        return _sharded_topk_bank(lab, num_classes, k, c, eps, dtype, device, group, timeout_s)
    rows = topk.topk_prior(lab, num_classes, k, c, eps, ids_dtype=id_dtype(num_classes), vals_dtype=dtype)
    if kind == "host":  # built where it lives: the host
        from .topk_host import HostTopKBank

        return HostTopKBank(rows, lab, device)
    dev = torch.device(device) if device is not None else lab.device
    rows = topk.TopKRows(rows.ids.to(dev), rows.vals.to(dev), rows.rest.to(dev), num_classes, rows.bound.to(dev))
    if kind == "local" or (kind == "auto" and not (dist.is_available() and dist.is_initialized())):
        return LocalTopKBank(rows, lab.to(dev))
    from .collective import Collective
    from .topk_replicated import ReplicatedTopKBank

    return ReplicatedTopKBank(rows, lab.to(dev), Collective(group, timeout_s))


def _sharded_topk_bank(lab, num_classes, k, c, eps, dtype, device, group, timeout_s) -> Bank:
    from .. import topk
    from .collective import Collective
    from .topk_local import id_dtype
    from .topk_sharded import ShardedTopKBank

    comm = Collective(group, timeout_s)
    dev = torch.device(device) if device is not None else lab.device
    rows = topk.topk_prior(lab[comm.rank::comm.world], num_classes, k, c, eps, ids_dtype=id_dtype(num_classes),
                           vals_dtype=dtype)
    rows = topk.TopKRows(rows.ids.to(dev), rows.vals.to(dev), rows.rest.to(dev), num_classes, rows.bound.to(dev))
    return ShardedTopKBank(rows, lab.to(dev), comm)


def make_bank(kind, labels=None, num_classes=None, c=100.0, eps=1e-2, dtype=torch.float32, prior=None,
              device=None, group=None, timeout_s=120.0, shard_above_bytes=256 * 2 ** 20, top_k=None) -> Bank:
    """Builds a bank of the given kind from labels (or an explicit prior); ``top_k``: the
    top-k format (docs/method.md §12)."""
    from .collective import Collective

    if top_k is not None:
        return make_topk_bank(kind, labels, num_classes, top_k, c, eps, dtype, prior, device, group, timeout_s)

    if dtype not in _validate.FUSED_DTYPES + (torch.float64,):
        raise TypeError(f"bank dtype must be float32, bfloat16, float16 or float64, got {dtype}")
    if prior is None and (labels is None or num_classes is None):
        raise ValueError("give labels and num_classes, or an explicit prior")
    n = prior.shape[0] if prior is not None else len(torch.as_tensor(labels))
    c_count = prior.shape[1] if prior is not None else num_classes
    kind = resolve_kind(kind, n, c_count or 0, dtype, shard_above_bytes)
    dev = torch.device(device) if device is not None else None
    # every kind builds its rows where they will live, in one piece of memory (no copy after)
    if kind == "host":
        pin = dev is not None and dev.type == "cuda" and torch.cuda.is_available()
        alpha = prior_rows(labels, num_classes, c, eps, dtype, prior, device="cpu", pin=pin)
        return HostBank(alpha, given_labels(labels, prior), device)
    if kind == "local":
        alpha = prior_rows(labels, num_classes, c, eps, dtype, prior, device=dev)
        return LocalBank(alpha, given_labels(labels, prior).to(alpha.device))
    comm = Collective(group, timeout_s)
    rows = slice(comm.rank, None, comm.world) if kind == "sharded" else slice(None)
    alpha = prior_rows(labels, num_classes, c, eps, dtype, prior, rows, device=dev or "cpu")
    lab = given_labels(labels, prior).to(alpha.device)  # all N: label read-outs index them by global id
    if kind == "sharded":
        return ShardedBank(alpha, lab, n, comm)
    return ReplicatedBank(alpha, lab, comm)


__all__ = ["Bank", "StepConfig", "StepPlan", "LocalBank", "HostBank", "ReplicatedBank", "ShardedBank",
           "DistributedBank", "make_bank", "padding_mask", "KINDS"]

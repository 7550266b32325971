"""Input validation shared by every backend.

Every public op calls these checks before dispatching, so that every backend
raises the same exception type with the same message, and raises it before the
bank is touched. Data-dependent checks (index range, duplicates) read the index
on the host; pass ``validate=False`` to the public ops to skip them (for CUDA
graph capture). The fused kernels still never write outside the bank: they skip
out-of-range rows.
"""
from __future__ import annotations

import math

import torch

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
TARGETS = ("posterior", "prior")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def reduction_code(reduction) -> int:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
    return REDUCTIONS[reduction]


def positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0.0) or math.isinf(value):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return value


def gamma_value(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a real number, got {type(gamma).__name__}")
    gamma = float(gamma)
    if not (0.0 < gamma <= 1.0):
        raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
    return gamma


def tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(name: str, x: torch.Tensor) -> None:
    tensor(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def same_device(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev0 = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev0:
            raise ValueError(
                f"all tensors must be on one device: {items[0][0]} is on {dev0}, {k} is on {v.device}"
            )


def index_tensor(index, batch: int) -> None:
    tensor("index", index)
    if index.dtype not in _INT_DTYPES:
        raise TypeError(f"index must be an integer tensor, got dtype {index.dtype}")
    if index.dim() != 1 or index.shape[0] != batch:
        raise ValueError(
            f"index must have shape [{batch}] to match the logits' batch, got {list(index.shape)}"
        )


_fast_check = None


def index_values(index: torch.Tensor, n: int) -> None:
    """Range and duplicate checks (one host read of the index). CPU tensors use the
    C++ twin of this function (same checks, same messages) when the extension is loaded."""
    if index.numel() == 0:
        return
    if index.device.type == "cpu" and _fast_check is not None:
        _fast_check(index, n)
        return
    idx = index.detach()
    if idx.device.type != "cpu":
        idx = idx.cpu()
    idx = idx.to(torch.int64)
    lo, hi = torch.aminmax(idx)
    if int(lo) < 0 or int(hi) >= n:
        bad = idx[(idx < 0) | (idx >= n)]
        raise IndexError(
            f"index {int(bad[0])} is out of range for a bank of {n} rows "
            f"({bad.numel()} id(s) outside [0, {n}))"
        )
    if idx.numel() > 1:
        s = torch.sort(idx).values
        dup = s[1:] == s[:-1]
        if bool(dup.any()):
            first = int(s[1:][dup][0])
            raise ValueError(
                f"index contains duplicate id {first}; ids in one call must be distinct "
                f"(feed several views of one sample as logits of shape [V, B, C])"
            )


def bank(alpha, num_classes: int) -> None:
    floating("alpha", alpha)
    if alpha.dim() != 2:
        raise ValueError(f"alpha must have shape [N, C], got {list(alpha.shape)}")
    if alpha.shape[1] != num_classes:
        raise ValueError(
            f"alpha has {alpha.shape[1]} classes but the logits have {num_classes}"
        )
    if alpha.shape[1] > 1 and alpha.stride(1) != 1:
        raise ValueError("alpha must be contiguous along the class dimension (stride(1) == 1)")


def logits_tensor(logits, allow_views: bool = True) -> tuple[int, int, int]:
    floating("logits", logits)
    if logits.dim() == 2:
        b, c = logits.shape
        v = 1
    elif logits.dim() == 3 and allow_views:
        v, b, c = logits.shape
    else:
        want = "[B, C] or [V, B, C]" if allow_views else "[B, C]"
        raise ValueError(f"logits must have shape {want}, got {list(logits.shape)}")
    if c < 1:
        raise ValueError("logits must have at least one class (C >= 1)")
    if v < 1:
        raise ValueError("logits must have at least one view (V >= 1)")
    return v, b, c


def check_dps(logits, index, alpha, gamma, tau_e, target, reduction, validate=True):
    """Returns (V, B, C, gamma, tau_e, posterior: bool, reduction code)."""
    v, b, c = logits_tensor(logits)
    index_tensor(index, b)
    bank(alpha, c)
    same_device(logits=logits, index=index, alpha=alpha)
    gamma = gamma_value(gamma)
    tau_e = positive("tau_e", tau_e)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    red = reduction_code(reduction)
    if validate:
        index_values(index, alpha.shape[0])
    return v, b, c, gamma, tau_e, target == "posterior", red


def check_soft_ce(logits, target, reduction):
    _, b, c = logits_tensor(logits, allow_views=False)
    floating("target", target)
    if target.shape != logits.shape:
        raise ValueError(
            f"target must have the logits' shape {list(logits.shape)}, got {list(target.shape)}"
        )
    same_device(logits=logits, target=target)
    return b, c, reduction_code(reduction)


def check_supcon(features, labels, tau, soft_targets):
    """Returns (M, d, V, B) with V = 0 for flat [M, d] features."""
    floating("features", features)
    if features.dim() == 3:
        v, b, d = features.shape
        m = v * b
    elif features.dim() == 2:
        m, d = features.shape
        v, b = 0, m
    else:
        raise ValueError(f"features must have shape [V, B, d] or [M, d], got {list(features.shape)}")
    if d < 1:
        raise ValueError("features must have at least one dimension (d >= 1)")
    positive("tau", tau)
    if labels is not None and soft_targets is not None:
        raise ValueError("give labels or soft_targets, not both")
    if labels is not None:
        tensor("labels", labels)
        if labels.dtype not in _INT_DTYPES:
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] not in (b, m):
            raise ValueError(
                f"labels must have shape [{b}] (one per sample) or [{m}] (one per row), "
                f"got {list(labels.shape)}"
            )
    elif soft_targets is not None:
        floating("soft_targets", soft_targets)
        if soft_targets.dim() != 2 or soft_targets.shape[0] not in (b, m):
            raise ValueError(
                f"soft_targets must have shape [{b}, K] or [{m}, K], got {list(soft_targets.shape)}"
            )
    elif v == 0:
        raise ValueError(
            "supcon_loss without labels pairs the views of each sample: pass features of "
            "shape [V, B, d] (V >= 2), or give labels"
        )
    same_device(features=features, labels=labels, soft_targets=soft_targets)
    return m, d, v, b

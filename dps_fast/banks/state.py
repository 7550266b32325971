"""A bank as module state, the same for every bank kind: what a ``load_state_dict``
verifies before it writes, and what a module cast does to the bank.

Load: every tensor of the state dict is verified before the first write, so a failing load
leaves the rows and the labels bit-identical. The rows: a floating tensor of exactly this
bank's shape whose values are finite and > 0 once converted to the bank's dtype (a float32
mass of 1e5 is inf in float16, 1e-8 is 0). The labels: an integer tensor of exactly [N]
(no broadcasting, no [N, 1]) with values in [0, C). A problem goes to ``load_state_dict``'s
error list, which raises a RuntimeError naming it under ``strict=True`` and ``strict=False``
alike, as ``nn.Module`` does for a size mismatch.

Casts: the bank is state, not a parameter (like an optimizer's state). ``Module._apply``
functions move it (``.to(device)``, ``.cuda()``, ``.to("meta")``) but never change its dtype:
``.half()``, ``.double()`` or ``.to(torch.bfloat16)`` on a model that holds the loss keep the
bank's dtype, which only ``bank_dtype=`` at construction or ``DPSLoss.to_bank_dtype`` choose.
"""
from __future__ import annotations

import torch

from .. import _validate

LOAD_ERRORS = (TypeError, ValueError, IndexError)


def keep_dtype(fn, t: torch.Tensor) -> torch.Tensor:
    """``fn`` (a Module._apply function) applied to bank state ``t`` without changing its dtype:
    a cast (``.half()``, ``.to(device, dtype)``) only moves ``t`` to the device it names."""
    probe = fn(t.new_empty(0))  # what fn does, learnt on an empty tensor: no copy of the bank
    if probe.dtype == t.dtype:
        out = fn(t)  # a move, share_memory_(), ...: fn itself, as for a buffer
        if out.dtype == t.dtype:
            return out
    return t.to(probe.device)


def check_rows(rows, like: torch.Tensor, what: str) -> torch.Tensor:
    """Saved rows that may replace ``like`` (this bank's rows): same shape, floating, and
    valid in ``like``'s dtype. Raises naming the problem."""
    _validate.floating(what, rows)
    if tuple(rows.shape) != tuple(like.shape):
        raise ValueError(f"{what}: saved shape {tuple(rows.shape)}, this bank is {tuple(like.shape)}")
    _validate.bank_values_as(rows, like.dtype, what)
    return rows


def check_labels(labels, num_samples: int, num_classes: int, what: str = "given_labels") -> torch.Tensor:
    """Saved given labels: an integer tensor of exactly [N] with values in [0, C)."""
    _validate.tensor(what, labels)
    if labels.dtype not in _validate.INT_DTYPES:
        raise TypeError(f"{what}: dtype {labels.dtype}; given labels must be an integer tensor (class ids)")
    if tuple(labels.shape) != (num_samples,):
        raise ValueError(f"{what}: shape {list(labels.shape)} for a bank of {num_samples} rows; one label a row, "
                         f"shape [{num_samples}]")
    if labels.device.type == "meta":
        raise ValueError(f"{what} is on the meta device: it holds no values to check")
    if labels.numel():
        lo, hi = (int(v) for v in torch.aminmax(labels.to(torch.int64)))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{what}: label {lo if lo < 0 else hi} is out of range for {num_classes} classes "
                             f"(labels lie in [0, {num_classes}))")
    return labels


def verified(state: dict, rows_key: str, rows: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """The tensors of ``state`` to write, each verified (raises before anything is written):
    ``rows_key`` -> ``rows`` and ``given_labels`` -> ``labels``. The rows may come alone (a
    checkpoint of an older version: the labels are kept), the labels never: labels of one run
    over the rows of another would mix two states."""
    if "given_labels" in state and rows_key not in state:
        raise ValueError(f"given_labels: saved without the rows ({rows_key!r}); the labels load only with "
                         f"the bank they belong to")
    out = {}
    if rows_key in state:
        out[rows_key] = check_rows(state[rows_key], rows, rows_key)
    if "given_labels" in state:
        out["given_labels"] = check_labels(state["given_labels"], labels.shape[0], num_classes)
    return out


def write(staged: dict, rows_key: str, rows: torch.Tensor, labels: torch.Tensor) -> None:
    """Writes verified tensors in place (``copy_`` converts to the bank's dtype and device,
    rounding as the check's ``.to(dtype)`` did; without grad, as nn.Module loads, so a saved
    tensor that requires grad does not make the bank part of a graph)."""
    with torch.no_grad():
        if rows_key in staged:
            rows.copy_(staged[rows_key])
        if "given_labels" in staged:
            labels.copy_(staged["given_labels"])


BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_conversion(rows: torch.Tensor, dtype) -> None:
    """What construction checks, for converting the rows to ``dtype``: a bank dtype, and
    every value finite and > 0 once converted. Raises before anything changes."""
    if dtype not in BANK_DTYPES:
        raise TypeError(f"bank dtype must be float32, bfloat16, float16 or float64, got {dtype}")
    _validate.bank_values_as(rows, dtype, "the bank")


def converted(rows: torch.Tensor, dtype, pin: bool = False) -> torch.Tensor:
    """The rows in ``dtype`` (checked first), contiguous, one copy (pinned if ``pin``)."""
    check_conversion(rows, dtype)
    return torch.empty(rows.shape, dtype=dtype, device=rows.device, pin_memory=pin).copy_(rows)

"""Input validation shared by every op and every backend (each op's own checks, built
from these, live in its module under dps_fast/ops/).

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

from . import _contract as contract
from . import _device_checks, _extension

# The step's domain, declared once in dps_fast/_contract.py (which the eager fast path's C++
# filter reads too).
REDUCTIONS = {name: code for code, name in enumerate(contract.REDUCTIONS)}
TARGETS = contract.TARGETS
FUSED_DTYPES = tuple(getattr(torch, name) for name in contract.FUSED_DTYPES)
INT_DTYPES = tuple(getattr(torch, name) for name in contract.INDEX_DTYPES)


def reduction_code(reduction) -> int:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
    return REDUCTIONS[reduction]


def positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (0.0 < value < math.inf):  # comparisons, not math.isinf: they trace under torch.compile(dynamic=True)
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return value


# The smallest tau_e every backend computes with (FLT_MIN; the reason is in dps_fast/_contract.py).
MIN_TAU_E = contract.TAU_E_MIN


def evidence_temperature(tau_e) -> float:
    tau_e = positive("tau_e", tau_e)
    if tau_e < MIN_TAU_E:
        raise ValueError(f"tau_e must be at least {MIN_TAU_E:.8g} (the smallest normal float32, so that tau_e and "
                         f"1 / tau_e are normal float32 numbers in every backend), got {tau_e}")
    return tau_e


def target_name(target) -> str:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    return target


def valid_mask(valid, batch: int) -> None:
    tensor("valid", valid)
    if valid.dtype != torch.bool or tuple(valid.shape) != (batch,):
        raise ValueError(f"valid must be a bool tensor of shape [{batch}], got {valid.dtype} {list(valid.shape)}")


def canonical_index(index: torch.Tensor) -> torch.Tensor:
    """The index as a contiguous int64 tensor (every backend reads int64 ids: a uint8 index
    would be a boolean mask to PyTorch indexing, an int8 one would wrap). A bool tensor is
    refused: ``.to(int64)`` would silently read a mask as the ids 0 and 1. (Read-outs take
    masks through :func:`readout_index`.)"""
    if index.dtype == torch.bool:
        raise TypeError("index must hold integer sample ids, got a bool tensor; a mask is not an index "
                        "here: pass mask.nonzero().squeeze(1)")
    if index.dtype == torch.int64 and index.is_contiguous():
        return index
    return index.to(torch.int64).contiguous()


def readout_index(index, n: int) -> torch.Tensor:
    """The rows a read-out asks for, as int64 ids in [0, n): the one rule of every read-out
    (``DPSLoss.targets`` / ``posterior``, ``SoftLabels.targets`` / ``prior``).

    ``index``: integer ids [k] (any order, repeats allowed) or a bool mask [n] (read as the
    ids of its True entries, in order); a tensor, list or array. A mask of another length,
    ids outside [0, n) (negative ids are not wrapped) or another dtype raise."""
    if not isinstance(index, torch.Tensor):
        index = torch.as_tensor(index)
    if index.dtype == torch.bool:
        if index.dim() != 1 or index.shape[0] != n:
            raise ValueError(f"a bool mask must have one entry per sample: got shape {list(index.shape)} "
                             f"for {n} samples")
        return index.nonzero().squeeze(1)
    if index.numel() == 0:  # torch.as_tensor([]) is float32
        return torch.zeros(0, dtype=torch.int64, device=index.device)
    if index.is_floating_point() or index.is_complex():
        raise TypeError(f"index must be integer sample ids or a bool mask, got dtype {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"index must be a 1-D tensor of ids (or a bool mask [{n}]), got shape "
                         f"{list(index.shape)}")
    idx = canonical_index(index)
    index_range(idx, n)
    return idx


def gamma_value(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a real number, got {type(gamma).__name__}")
    gamma = float(gamma)
    if not (contract.GAMMA_LOW < gamma <= contract.GAMMA_HIGH):
        raise ValueError(f"gamma must lie in ({contract.GAMMA_LOW:g}, {contract.GAMMA_HIGH:g}], got {gamma}")
    return gamma


def tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(name: str, x: torch.Tensor) -> None:
    tensor(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev0 = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev0:
            raise ValueError(
                f"all tensors must be on one device: {items[0][0]} is on {dev0}, {k} is on {v.device}"
            )


def index_tensor(index, batch: int) -> None:
    tensor("index", index)
    if index.dtype not in INT_DTYPES:
        raise TypeError(f"index must be an integer tensor, got dtype {index.dtype}")
    if index.dim() != 1 or index.shape[0] != batch:
        raise ValueError(
            f"index must have shape [{batch}] to match the logits' batch, got {list(index.shape)}"
        )


# The C++ twin of index_values (dps_fast::check_index), or None where the extension is not loaded.
_fast_check = _extension.check_index


def index_values(index: torch.Tensor, n: int) -> None:
    """Range and duplicate checks (one host read of the index). CPU tensors use the
    C++ twin of this function (same checks, same messages) when the extension is loaded."""
    if index.numel() == 0:
        return
    if index.device.type == "cpu" and _fast_check is not None:
        _fast_check(index, n)
        return
    first = first_duplicate(index_range(index, n))
    if first is not None:
        raise duplicate_error(first)


def range_error(first_bad: int, count: int, n: int) -> IndexError:
    """The error of an index with ``count`` ids outside [0, n), the first ``first_bad``."""
    return IndexError(f"index {first_bad} is out of range for a bank of {n} rows ({count} id(s) outside [0, {n}))")


def duplicate_error(first: int) -> ValueError:
    return ValueError(f"index contains duplicate id {first}; ids in one call must be distinct "
                      f"(feed several views of one sample as logits of shape [V, B, C])")


def raise_deferred(wait: bool = True) -> None:
    """Raises the error of an earlier call whose index failed its check on the device
    (:mod:`dps_fast._device_checks`), with the host check's message and a note; ``wait``:
    wait for every check in flight (read-outs and saves do)."""
    failed = _device_checks.first_failure(wait)
    if failed is None:
        return
    count, first_bad, dup, n = failed
    err = range_error(first_bad, count, n) if count else duplicate_error(dup)
    raise type(err)(str(err) + " (an earlier call's index, found on the device after that call returned: it "
                              "wrote nothing and its loss is NaN)")


def first_duplicate(ids: torch.Tensor) -> int | None:
    """The smallest id that occurs twice in ``ids``, or None: the one duplicate rule of a
    call (index_values) and of a distributed step's global batch (banks/dist_base.py). The
    C++ twin is dps_fast::check_index (csrc/cpu/validate.cpp)."""
    if ids.numel() < 2:
        return None
    s = torch.sort(ids).values
    dup = s[1:] == s[:-1]
    return int(s[1:][dup][0]) if bool(dup.any()) else None


def checked_index(index: torch.Tensor, n: int) -> torch.Tensor:
    """Range and duplicate checks; returns the index as int64. Under torch.compile the check
    is the op ``dps_fast::check_index``, whose output feeds the step, so it stays in the graph.
    A CUDA index is checked on the device, without a host synchronisation
    (:mod:`dps_fast._device_checks`): the index comes back gated, all ids -1 if the check
    failed, and the error is raised at the next call."""
    if torch.compiler.is_compiling():
        return torch.ops.dps_fast.check_index(index, n)
    if _device_checks.on_device(index):
        raise_deferred(wait=False)
        return _device_checks.gated_index(canonical_index(index), n)
    index_values(index, n)
    return canonical_index(index)


def index_range(index: torch.Tensor, n: int) -> torch.Tensor:
    """Range check only (one host read); returns the index as int64 on the host."""
    idx = index.detach()
    if idx.device.type != "cpu":
        idx = idx.cpu()
    idx = idx.to(torch.int64)
    if idx.numel() == 0:
        return idx
    lo, hi = torch.aminmax(idx)
    if int(lo) < 0 or int(hi) >= n:
        bad = idx[(idx < 0) | (idx >= n)]
        raise range_error(int(bad[0]), bad.numel(), n)
    return idx


def bank_values(alpha: torch.Tensor, what: str) -> None:
    """Every entry finite and > 0 in the bank's own dtype (checked after the cast: 1e-8
    is 0 in float16, 1e5 is inf)."""
    bad = ~(torch.isfinite(alpha) & (alpha > 0))
    if bool(bad.any()):
        v = alpha[bad][0]
        raise ValueError(f"{what} must be finite and > 0 in the bank dtype {alpha.dtype}, but holds {float(v)} "
                         f"({int(bad.sum())} such entries); choose values that {alpha.dtype} can represent")


def bank_values_as(rows, dtype: torch.dtype, what: str, chunk_elems: int = 1 << 20) -> None:
    """:func:`bank_values` of ``rows`` [N, C] as they will be once converted to the bank dtype
    ``dtype``, a block of rows at a time: the check's scratch memory is one block, not a bank
    (a bank can fill most of the host). Used by construction, state_dict loads and conversions."""
    floating(what, rows)
    if rows.dim() != 2:
        raise ValueError(f"{what} must have shape [N, C], got {list(rows.shape)}")
    if rows.device.type == "meta":
        raise ValueError(f"{what} is on the meta device: it holds no values to check")
    step = max(1, int(chunk_elems) // max(1, rows.shape[1]))
    for k in range(0, rows.shape[0], step):
        block = rows[k:k + step].detach().to(dtype)
        if block.numel() == 0:
            continue
        lo, hi = torch.aminmax(block)  # one pass, no mask; NaN propagates into lo
        if not (float(lo) > 0 and float(hi) < math.inf):
            bank_values(block, what)  # raises, naming a bad value


def bank_storage(alpha: torch.Tensor, logits: torch.Tensor, index: torch.Tensor | None = None) -> None:
    """The bank is written in place: each row must own its memory (no expanded, stride-0 or
    self-overlapping views) and share none with what the step reads (the logits, the index).
    (Storage is not visible to torch.compile's tracer: checked in eager mode only.)"""
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(logits):
        return
    # _debug_has_internal_overlap answers 1 (overlap) or 2 (too hard to tell: any non-dense layout,
    # e.g. a column slice big[:, :C] or big[::2], whose rows are disjoint). With stride(1) == 1
    # (checked by bank()), rows are disjoint exactly when stride(0) >= C.
    rows_overlap = alpha.shape[0] > 1 and alpha.shape[1] > 0 and alpha.stride(0) < alpha.shape[1]
    if rows_overlap or torch._debug_has_internal_overlap(alpha) == 1:
        raise ValueError("alpha must not be an expanded or self-overlapping view (its rows are written in "
                         "place); pass a tensor that owns its memory, e.g. alpha.contiguous()")
    if shares_memory(alpha, logits):
        raise ValueError("alpha shares memory with the logits; the bank must be a separate tensor")
    if index is not None and shares_memory(alpha, index):
        raise ValueError("alpha shares memory with the index; the bank must be a separate tensor")


def memory_span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte] that ``t``'s elements occupy (strides are >= 0)."""
    start = t.data_ptr()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a write to ``a`` may change ``b``: one storage, or overlapping address ranges
    (two storages over one buffer: torch.from_numpy of two views of one array,
    torch.frombuffer, DLPack). Address ranges, not elements: views that interleave without
    touching (columns of one buffer) count as sharing, as one storage always did.
    Eager mode only (csrc/fast_path.cpp::shares_memory is the C++ twin)."""
    if not a.numel() or not b.numel() or a.device != b.device or a.device.type == "meta":
        return False
    if a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr():
        return True
    (a0, a1), (b0, b1) = memory_span(a), memory_span(b)
    return a0 < b1 and b0 < a1


def disjoint_from_logits(name: str, x: torch.Tensor, logits: torch.Tensor) -> None:
    """With ``inplace_grad`` the gradient is written over the logits' memory while ``x`` is
    still read: they must not overlap."""
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(logits):
        return
    if shares_memory(logits, x):
        raise ValueError(f"{name} shares memory with the logits, which inplace_grad=True overwrites with the "
                         f"gradient; pass a separate {name} or inplace_grad=False")


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

"""The eager fast path (docs/contributing.md, "The eager fast path"): a plain eager call on CPU
tensors runs as one C++ op, ``dps_fast::dps_ce_eager`` (csrc/fast_path.cpp), instead of the
Python checks and dispatch. This module owns its Python side: when a call may take it
(:func:`eager_op`), whether its arguments have the plain types the op takes
(:func:`plain_arguments`), and the call itself, which falls back on a decline (:func:`step`).
What the op accepts is declared once, in :mod:`dps_fast._contract`.

The speed it buys, measured side by side on the 2-core VM (benchmarks/overhead_probe.py,
[128, 10], 2026-12-07): the forward 8.9 us against 43 us through the Python path.
"""
from __future__ import annotations

import sys

import torch

from . import _contract as contract
from . import _dispatch, _extension

EAGER_DECLINES = contract.DECLINES
_BACKENDS = (None,) + contract.EAGER_BACKENDS
_eager_bindings = _extension.eager_bindings  # read by eager_op, on the hot path, as a module global


# The plain type of each argument kind of contract.EAGER_ARGUMENTS, as an expression of the
# argument (the binding in csrc/module.cpp checks the same, exactly). plain_arguments is compiled
# from these once, at import: a loop over per-kind functions cost 2.1 us a call where the
# compiled expression costs 0.4 us (2-core VM, 2026-12-07; the whole forward is ~9 us at [128, 10]).
_PLAIN = {
    "tensor": "isinstance({0}, Tensor)",
    "bank": "isinstance({0}, Tensor)",
    "real": "(type({0}) is float or (type({0}) is int and -2 ** 53 <= {0} <= 2 ** 53))",
    "target": "(type({0}) is str and {0} in TARGETS)",
    "reduction": "(type({0}) is str and {0} in REDUCTIONS)",
    "flag": "type({0}) is bool",
    "backend": "({0} is None or type({0}) is str)",
}


def _compiled_plain_arguments():
    names = [name for name, _ in contract.EAGER_ARGUMENTS]
    test = " and ".join(_PLAIN[kind].format(name) for name, kind in contract.EAGER_ARGUMENTS)
    source = f"def plain_arguments({', '.join(names)}):\n    return {test}\n"
    namespace = {"Tensor": torch.Tensor, "TARGETS": contract.TARGETS, "REDUCTIONS": contract.REDUCTIONS}
    exec(compile(source, f"<{__name__}.plain_arguments>", "exec"), namespace)
    return namespace["plain_arguments"]


plain_arguments = _compiled_plain_arguments()
plain_arguments.__doc__ = """Whether the eager op's schema takes these arguments (in the order of
contract.EAGER_ARGUMENTS) as they are: anything else takes the Python path, whose checks name
the problem."""


def step(logits, index, alpha, gamma, tau_e, target, reduction, update, validate, backend):
    """The DPS step as the one C++ op, or None where the fast path does not apply or the op
    declines, untouched: the caller then takes its Python path, which runs the call or raises
    the one error message for it."""
    eager = eager_op(contract.EAGER_OP, logits, backend)
    if eager is None:
        return None
    if not plain_arguments(logits, index, alpha, gamma, tau_e, target, reduction, update, validate, backend):
        return None
    try:
        return eager(logits, index, alpha, gamma, tau_e, target, reduction, update, validate, backend)
    except NotImplementedError as e:
        if not str(e).startswith(EAGER_DECLINES):
            raise
        return None


def eager_op(op_name: str, x, backend):
    """The C++ op ``op_name`` that runs a whole public call on CPU tensors, or None where the
    call takes the Python path: the C++ ops are not loaded, ``x`` is not a CPU tensor, another
    backend is named, the call is traced (torch.compile), transformed (torch.func) or re-run
    inside backward (activation checkpointing), compiled autograd is on, or a torch function
    mode is active. The op itself declines whatever else it does not take on (a dispatch
    mode among them, :data:`EAGER_DECLINES`)."""
    if backend not in _BACKENDS or not isinstance(x, torch.Tensor) or not x.is_cpu:
        return None
    if torch.compiler.is_compiling() or torch._C._current_graph_task_id() != -1 or \
            torch._C._functorch.is_functorch_wrapped_tensor(x):
        return None
    # a torch function mode would see the eager op in place of the Python path's calls
    if torch._C._is_torch_function_mode_enabled():
        return None
    # the fast path's autograd node cannot be traced by compiled autograd (csrc/ops.cpp)
    compiled_autograd = sys.modules.get("torch._dynamo.compiled_autograd")
    if compiled_autograd is not None and compiled_autograd.compiled_autograd_enabled:
        return None
    if _extension.load_error is not None:
        return None
    found = _eager_bindings.get(op_name)
    return found if found is not None else _dispatch.op("cpu", op_name)

"""Where the time of a small fused DPS call goes (issue #14, small shapes): the public
call's forward, its backward, the eager op that runs the whole forward in C++
(csrc/fast_path.cpp) through torch.ops and through its CPython binding (csrc/module.cpp),
the raw kernel op, the Python path's checks and forward, and the
autograd engine's fixed cost for one ``backward()`` through a one-node graph, against the
hand-written step.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        python benchmarks/overhead_probe.py --shapes 128x10 256x100

Medians over ``--rounds`` rounds of ``--calls`` calls each, one thread (``--threads``), all in
one process, the cases interleaved round by round. ``make bench`` runs it with the benchmarks'
2 threads and keeps benchmarks/results/overhead-probe.json: the small-shape ratio against
the hand-written step, measured side by side (pytest-benchmark times each provider in its
own block of single calls, which the VM's drift moves by up to 2x).
Run it outside the repository root (or after ``make install``): it measures the installed
package.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dps_fast  # noqa: E402
from common import environment  # noqa: E402
from dps_fast.ops import dps_cross_entropy as step_module  # noqa: E402


def interleaved_us(cases: dict, calls: int, rounds: int) -> dict:
    """Median over rounds of the mean time per call of each case. Every round times every
    case once, in turn, so that the VM's drift (2x between minutes) hits them all alike.
    A case is ``fn`` or ``(fn, setup)``: ``setup(calls)`` builds the round's input outside
    the timed region and ``fn`` gets it."""
    times = {name: [] for name in cases}
    for r in range(rounds + 1):  # the first round warms up
        for name, case in cases.items():
            fn, setup = case if isinstance(case, tuple) else (case, None)
            arg = setup(calls) if setup else None
            t0 = time.perf_counter()
            fn(arg)
            if r:
                times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def python_path(fn):
    """``fn`` with the eager fast path switched off: the call goes through the Python checks."""
    def run():
        saved = dps_fast._fast_path.eager_op
        dps_fast._fast_path.eager_op = lambda *args: None
        try:
            return fn()
        finally:
            dps_fast._fast_path.eager_op = saved
    return run


def probe(b: int, c: int, n: int, calls: int, rounds: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    alpha = dps_fast.init_prior(torch.randint(0, c, (n,), generator=gen), c)
    z = torch.randn(b, c, generator=gen).requires_grad_(True)
    idx = torch.randperm(n, generator=gen)[:b]
    zd, grad = z.detach(), torch.empty(b, c)

    def loop(f):
        return lambda _: [f() for _ in range(calls)]

    def fused_loss():
        return dps_fast.dps_cross_entropy(z, idx, alpha, backend="cpu")

    def fused_step():
        z.grad = None
        fused_loss().backward()

    def hand_step():
        z.grad = None
        with torch.no_grad():
            rows = alpha.index_select(0, idx) * 0.95 + torch.softmax(z, -1)
            alpha.index_copy_(0, idx, rows)
            target = rows / rows.sum(-1, keepdim=True)
        torch.nn.functional.cross_entropy(z, target).backward()

    def backward_of(make):
        """backward() alone: the losses are built outside the timed region."""
        def run(losses):
            for loss in losses:
                z.grad = None
                loss.backward()
        return run, lambda k: [make() for _ in range(k)]

    eager = torch.ops.dps_fast.dps_ce_eager.default
    binding = dps_fast._fast_path._eager_bindings.get("dps_ce_eager")  # csrc/module.cpp
    out = interleaved_us({
        "hand fwd+bwd": loop(hand_step),
        "fused fwd+bwd": loop(fused_step),
        "fused fwd": loop(fused_loss),
        "fused bwd": backward_of(fused_loss),
        "engine floor: bwd of z.sum()": backward_of(lambda: z.sum()),
        "eager op via torch.ops (whole fwd in C++)": loop(
            lambda: eager(z, idx, alpha, 0.95, 1.0, "posterior", "mean", True, True, None)),
        **({"eager op via its binding (dps_fast._C)": loop(
            lambda: binding(z, idx, alpha, 0.95, 1.0, "posterior", "mean", True, True, None))} if binding else {}),
        "Python-path fwd": loop(python_path(fused_loss)),
        "Python-path checks": loop(lambda: step_module.check(z, idx, alpha, 0.95, 1.0, "posterior", "mean")),
        "raw op (kernel + dispatch)": loop(
            lambda: torch.ops.dps_fast.dps_ce_fwd.default(zd, idx, alpha, grad, 0.95, 1.0, True, True, 1)),
        "attach_grad op (the Python path's node)": loop(
            lambda: torch.ops.dps_fast.attach_grad.default(grad[0, 0], z, grad)),
    }, calls, rounds)
    out["hand / fused"] = out["hand fwd+bwd"] / out["fused fwd+bwd"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["128x10", "256x100"])
    p.add_argument("--n", type=int, default=50_000, help="bank rows")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    results = {}
    for shape in a.shapes:
        b, c = (int(x) for x in shape.split("x"))
        r = probe(b, c, a.n, a.calls, a.rounds)
        results[shape] = r
        print(f"[{b}, {c}] " + ", ".join(f"{k} {v:.2f}x" if k == "hand / fused" else f"{k} {v:.1f} us"
                                         for k, v in r.items()))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"us_per_call_medians": results, "calls": a.calls, "rounds": a.rounds, "N": a.n,
                       "environment": environment()}, fh, indent=1)


if __name__ == "__main__":
    main()

"""Shared pieces of the device check (benchmarks/gpu_check.sh): the device, results written
as JSON lines the moment they exist, stage deadlines, a bound on torch.compile warm-up,
kernel timing with the L2 cache flushed, and the byte models.

DRY_RUN=1 (or no CUDA device) runs everything on CPU tensors, on tiny shapes, with the cpu
backend and Triton in its interpreter: the check's logic is tested in `make test`, so a
scarce GPU session never meets a script bug. Dry-run numbers say nothing about speed.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DRY = os.environ.get("DRY_RUN", "0") == "1" or not torch.cuda.is_available()
DEV = "cpu" if DRY else "cuda"
NO_CUDA = "skipped: no CUDA"


class Results:
    """Appends one JSON object per line to a file, flushed at once: a run killed at its
    time limit still leaves every line it wrote."""

    def __init__(self, path: str, stage: str):
        self.path, self.stage = path, stage

    def write(self, **record) -> dict:
        record = {"stage": self.stage, **record, "t": round(time.time(), 1)}
        line = json.dumps(record, default=str)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)
        return record


class Deadline:
    """The stage's own budget: start no new case once it is spent (the shell's `timeout`
    is the backstop that kills a case that overruns)."""

    def __init__(self, budget_s: float):
        self.end = time.time() + budget_s

    def left(self) -> float:
        return self.end - time.time()


class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises CompileTimeout in the main thread after `seconds`, and again every 0.5 s until it
    gets out: inductor catches and wraps exceptions at some points (seen here: a first alarm
    became an InductorError, a later one was swallowed and the compile ran 47 s past a 3 s
    bound). Cold torch.compile of one DPS step shape takes 20-40 s (issue 25: the old check's
    budget went after 2-4 cases), so each warm-up runs under its own bound and an overrun case
    is skipped rather than waited for."""
    def on_alarm(signum, frame):
        raise CompileTimeout(f"compile exceeded its budget of {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01), 0.5)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def is_timeout(exc: BaseException) -> bool:
    """A CompileTimeout, also when a library wrapped it in its own exception."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, CompileTimeout) or "compile exceeded its budget" in str(exc)[:4000]:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def free_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def l2_flush_buffer() -> torch.Tensor:
    """A buffer of at least twice the L2 size (H100: 50 MB, H200: 60 MB): writing it between
    repetitions evicts the previous repetition's lines, so a small case is timed from HBM
    rather than reporting more than HBM bandwidth out of L2 (issue 25)."""
    if DEV != "cuda":
        return torch.empty(2 ** 21, dtype=torch.float32)  # dry run: 8 MB, exercises the path
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 60 * 2 ** 20
    return torch.empty(max(2 * l2, 128 * 2 ** 20) // 4, dtype=torch.float32, device="cuda")


def time_interleaved(fns: dict, flush: torch.Tensor, reps: int, warmup: int = 0 if DRY else 2) -> dict:
    """Median seconds of each callable, the callables interleaved rep by rep (a kernel and the
    copy it is compared with see the same clocks), the L2 flushed before every call and only
    the call itself between the CUDA events. One synchronisation at the end."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    spans = {name: [] for name in fns}
    for r in range(reps):
        for name, fn in fns.items():
            flush.fill_(float(r))
            spans[name].append(_timed_call(fn))
    sync()
    return {name: statistics.median(_seconds(s) for s in ss) for name, ss in spans.items()}


def _timed_call(fn):
    if DEV == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        return a, b
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _seconds(span) -> float:
    return span if isinstance(span, float) else span[0].elapsed_time(span[1]) / 1e3


def dps_bytes(*args):
    """The CPU suite's byte model (benchmarks/common.py), imported late: common imports
    dps_fast, which must not load before the build stage has built it."""
    from common import dps_bytes as model
    return model(*args)


def soft_ce_bytes(*args):
    from common import soft_ce_bytes as model
    return model(*args)


def supcon_bytes(*args):
    from common import supcon_bytes as model
    return model(*args)


def copy_pair(nbytes: int):
    """Source and destination of a device copy moving `nbytes` (read + write), the same
    convention as the byte models."""
    n = max(nbytes // 8, 1)
    src = torch.ones(n, dtype=torch.float32, device=DEV)
    return src, torch.empty_like(src)


def environment() -> dict:
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)", "dry_run": DRY}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if DEV == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(sms=p.multi_processor_count, l2_bytes=getattr(p, "L2_cache_size", None),
                   memory_gib=round(p.total_memory / 2 ** 30, 1), capability=f"{p.major}.{p.minor}")
    return env

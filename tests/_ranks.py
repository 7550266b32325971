"""Spawning the ranks of a multi-process test (importable by spawned children)."""
import os
import sys

import torch.multiprocessing as mp


def spawn_ranks(worker, nprocs, *args):
    """mp.spawn(worker, args, nprocs), except that a rank whose worker returned leaves with
    os._exit(0), skipping the interpreter's teardown. Why: two gloo ranks that had both finished
    destroy_process_group still aborted at exit ("terminate called without an active
    exception", SIGABRT) in 3 of 123 runs of `python tools/gloo_exit_stress.py` on the 2-core VM
    (torch 2.13), and failed 3 of 6 fresh-clone CIs on 2026-12-07; leaving by os._exit: 0 of 150."""
    mp.spawn(_run_then_leave, args=(worker, args), nprocs=nprocs, join=True)


def _run_then_leave(rank, worker, args):
    worker(rank, *args)  # tears its group down itself; an exception propagates to mp.spawn
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def failing_worker(rank, fail_rank):
    """For tests/test_ranks.py: rank `fail_rank` raises."""
    if rank == fail_rank:
        raise ValueError(f"rank {rank} failed on purpose")

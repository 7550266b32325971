"""How often does a finished gloo rank abort at exit? Repeats a small 2-rank DDP run and counts
ranks that die, for each way of leaving (the measurement behind tests/_ranks.py and
dps-train's worker exit).

    python tools/gloo_exit_stress.py --exit teardown --runs 100   # return normally
    python tools/gloo_exit_stress.py --exit os_exit --runs 100    # os._exit(0) after destroy

2-core VM, torch 2.13, 2026-12-07: teardown, 3 of 123 runs had a rank abort ("terminate called
without an active exception", SIGABRT; always rank 1, always after both ranks had returned from
destroy_process_group, so at interpreter exit); os_exit, 0 of 150.
"""
import argparse
import datetime
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, world, store, how, steps):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(steps):
        loss = ddp(torch.randn(40, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        dist.all_reduce(loss.detach().clone())
    del ddp
    dist.barrier()
    dist.destroy_process_group()
    if how == "os_exit":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exit", choices=["teardown", "os_exit"], default="teardown")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    failed, start = 0, time.time()
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                mp.spawn(worker, args=(2, tmp, args.exit, args.steps), nprocs=2, join=True)
            except mp.ProcessExitedException as e:
                failed += 1
                print(f"run {i}: {e}", flush=True)
    print(f"exit={args.exit}: {failed} of {args.runs} runs had a rank die ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()

"""dps-train: train image classifiers with DPS and baselines on offline data.

    dps-train --dataset digits --compare ce,dps             # the `make demo` job
    dps-train --dataset fashion-mnist --model resnet --method dps --epochs 60 \\
              --train-subset 10000 --noise sym --noise-rate 0.4 --out runs/fm
    python -m dps_fast.train --help
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .experiment import ExperimentData
from .files import json_dump
from .loop import run
from .methods import METHODS
from .noise import KINDS

DEMO = dict(dataset="digits", model="mlp", compare="ce,dps", epochs=40, batch_size=64, lr=0.05,
            weight_decay=0.0, width=256, augment=False, c=100.0, gamma=0.95)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dps-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--demo", action="store_true", help="the `make demo` preset: digits, MLP, CE vs DPS")
    a("--dataset", default="digits", help="digits | fashion-mnist | mnist-5k | npz:PATH")
    a("--data-root", default=None, help="folder of the dataset files (fashion-mnist IDX files)")
    a("--train-subset", type=int, default=0, help="stratified training subset size (0 = all)")
    a("--ood", default="auto", help="OOD test set: auto (mnist-5k for fashion-mnist) | none | a dataset name")
    a("--model", default="mlp", choices=["mlp", "cnn", "resnet"])
    a("--width", type=int, default=0, help="model width (0 = the model's default)")
    a("--blocks", type=int, default=2, help="residual blocks per stage (resnet)")
    a("--method", default="dps", choices=METHODS)
    a("--compare", default="", help="comma-separated methods to run on the same split and seed")
    a("--epochs", type=int, default=30)
    a("--batch-size", type=int, default=128)
    a("--optimizer", default="sgd", choices=["sgd", "adam"])
    a("--lr", type=float, default=0.05)
    a("--momentum", type=float, default=0.9)
    a("--weight-decay", type=float, default=5e-4)
    a("--augment", action=argparse.BooleanOptionalAction, default=True,
      help="random crop (pad 2, or 1 for 8x8) and, where label-preserving, horizontal flip")
    a("--seed", type=int, default=0)
    a("--noise", default="none", choices=KINDS)
    a("--noise-rate", type=float, default=0.0)
    a("--noise-seed", type=int, default=12345)
    a("--c", type=float, default=100.0, help="DPS prior concentration on the label")
    a("--eps", type=float, default=1e-2, help="DPS prior concentration elsewhere")
    a("--gamma", type=float, default=0.95, help="DPS discount")
    a("--tau-e", type=float, default=1.0, help="DPS evidence temperature")
    a("--bank-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a("--con-weight", type=float, default=0.5, help="lambda of the contrastive term (dps+con)")
    a("--con-tau", type=float, default=0.1)
    a("--con-positives", default="hard", choices=["hard", "soft", "views"])
    a("--proj-dim", type=int, default=64)
    a("--ls-eps", type=float, default=0.1)
    a("--pskd-alpha", type=float, default=0.8)
    a("--te-beta", type=float, default=0.6)
    a("--te-weight", type=float, default=0.5)
    a("--backend", default=None, help="dps_fast backend (default: automatic)")
    a("--nproc", type=int, default=1, help="data-parallel processes (DDP; gloo on CPU, NCCL on GPUs)")
    a("--bank", default="auto", choices=["auto", "local", "replicated", "sharded", "host"],
      help="where the DPS bank lives: local (one process), replicated / sharded (across --nproc ranks; "
           "auto picks by size), host (pinned host memory, model on GPU)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    a("--out", default="runs/latest")
    a("--resume", action="store_true", help="continue from <out>/<method>/checkpoint.pt")
    a("--plots", action=argparse.BooleanOptionalAction, default=True)
    a("--progress", action=argparse.BooleanOptionalAction, default=None,
      help="tqdm progress bars (default: when stderr is a terminal)")
    a("--eval-batch", type=int, default=1024)
    a("--eval-every", type=int, default=1, help="evaluate on the test (and OOD) set every K epochs and at the end")
    a("--label-issues", action="store_true", help="DPS methods: write label_issues.csv (likely label errors, "
      "ranked) and, with injected noise, their precision/recall/F1/AUROC into final.json")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.demo:
        explicit = {k.lstrip("-").split("=")[0].replace("-", "_") for k in (argv or sys.argv[1:]) if k.startswith("--")}
        for k, v in DEMO.items():
            if k not in explicit:
                setattr(args, k, v)
    return args


def format_table(results: list) -> str:
    cols = [("accuracy", "acc %", 100), ("ece_pct", "ECE % (15 bins)", 1), ("classwise_ece_pct", "cw-ECE %", 1),
            ("nll", "NLL", 1), ("brier", "Brier", 1)]
    if any("ood_auroc" in r["final"] for r in results):
        cols.append(("ood_auroc", "OOD AUROC", 1))
    head = "| method | " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for r in results:
        f = r["final"]
        cells = [f"{f[k] * s:.2f}" if k in ("accuracy",) or k.endswith("pct") else f"{f[k] * s:.4f}"
                 for k, _, s in cols]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ddp_worker(rank, world, args, methods, store):
    import datetime

    import torch.distributed as dist

    if args.threads:
        torch.set_num_threads(args.threads)
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        data = ExperimentData(args)
        for m in methods:
            run(args, m, data, log=print if rank == 0 else (lambda *a, **k: None), rank=rank, world=world)
        dist.barrier()  # quiesce before teardown (gloo aborts a process torn down mid-traffic)
    finally:
        dist.destroy_process_group()


def check_methods(args) -> list:
    methods = [m.strip() for m in args.compare.split(",") if m.strip()] or [args.method]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"dps-train: unknown method {m!r}; choose from {', '.join(METHODS)}")
    if args.nproc > 1:
        bad = [m for m in methods if m in ("pskd", "te")]
        if bad:
            raise SystemExit(f"dps-train: --nproc > 1 supports ce, ls, dps and dps+con (not {', '.join(bad)})")
        if args.bank in ("local", "host"):
            raise SystemExit(f"dps-train: --bank {args.bank} is a single-process option")
    elif args.bank in ("replicated", "sharded"):
        raise SystemExit(f"dps-train: --bank {args.bank} needs --nproc > 1")
    return methods


def run_all(args, methods, data) -> list:
    if args.nproc == 1:
        return [run(args, m, data) for m in methods]
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(args.nproc, args, methods, os.path.join(tmp, "store")),
                 nprocs=args.nproc, join=True)
    results = []
    for m in methods:
        with open(os.path.join(args.out, m, "final.json")) as f:
            results.append(json.load(f))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = check_methods(args)
    t0 = time.perf_counter()
    data = ExperimentData(args)
    print(f"dps-train: {data.name}, {len(data.labels)} train / {len(data.y_test)} test images "
          f"{data.image_shape}, {data.num_classes} classes; noise {data.noise_info}; OOD {data.ood_name}"
          + (f"; {args.nproc} processes, bank {args.bank}" if args.nproc > 1 else ""))
    print("config: " + json.dumps({k: v for k, v in sorted(vars(args).items())}))
    os.makedirs(args.out, exist_ok=True)
    results = run_all(args, methods, data)
    table = format_table(results)
    wall = time.perf_counter() - t0
    print(f"\n{data.name}, model {args.model}, {args.epochs} epochs, seed {args.seed}, "
          f"noise {data.noise_info['kind']} {data.noise_info.get('realised', 0):.3f} realised; "
          f"final-epoch test metrics:\n{table}\n(wall time {wall:.1f} s)")
    if len(results) > 1:
        json_dump({"results": [{k: r[k] for k in ("method", "final", "timing")} for r in results],
                   "table": table, "config": vars(args)}, os.path.join(args.out, "compare.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

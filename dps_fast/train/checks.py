"""Checks of dps-train's arguments, all before any data is read or file written.

Each failed check raises :class:`UsageError` naming the argument, the value and the fix.
"""
from __future__ import annotations

import importlib.util
import math
import sys

import torch

from .errors import UsageError
from .noise import ASYM_MAPS

# (argument, lowest, highest, lowest included, highest included); None = unbounded
RANGES = {
    "epochs": (1, None, True, None), "batch_size": (1, None, True, None), "lr": (0, None, False, None),
    "momentum": (0, 1, True, False), "weight_decay": (0, None, True, None), "train_subset": (0, None, True, None),
    "width": (0, None, True, None), "blocks": (1, None, True, None), "noise_rate": (0, 1, True, True),
    "c": (0, None, False, None), "eps": (0, None, False, None), "gamma": (0, 1, False, True),
    "tau_e": (0, None, False, None), "tau_e_adapt": (0, None, True, None), "con_weight": (0, None, True, None),
    "con_tau": (0, None, False, None),
    "proj_dim": (1, None, True, None), "ls_eps": (0, 1, True, True), "pskd_alpha": (0, 1, True, True),
    "te_beta": (0, 1, True, False), "te_weight": (0, 1, True, True), "nproc": (1, None, True, None),
    "threads": (0, None, True, None), "eval_batch": (1, None, True, None), "eval_every": (1, None, True, None),
    "stop_after": (0, None, True, None), "workers": (0, None, True, None), "image_size": (8, None, True, None),
    "top_k": (0, None, True, None),
}
BUILT_IN_MODELS = ("mlp", "cnn", "resnet")
# (package imported, pip name, why it is needed)
HINTS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "PIL": "pillow", "torchvision": "torchvision",
         "timm": "timm"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_range(name: str, value) -> None:
    if name == "tau_e" and value == "auto":  # the loss's own adaptation (--tau-e auto)
        return
    lo, hi, lo_in, hi_in = RANGES[name]
    ok = math.isfinite(value)
    if ok and lo is not None:
        ok = value >= lo if lo_in else value > lo
    if ok and hi is not None:
        ok = value <= hi if hi_in else value < hi
    if not ok:
        left = "" if lo is None else ("[" if lo_in else "(") + f"{lo}, "
        right = "inf)" if hi is None else f"{hi}" + ("]" if hi_in else ")")
        raise UsageError(f"{_flag(name)} {value}: must lie in {left}{right}")


def check_noise(args) -> None:
    if args.noise == "none" and args.noise_rate > 0:
        raise UsageError(f"--noise-rate {args.noise_rate} needs a noise kind: add --noise sym, sym-exclusive "
                         f"or asym")
    if args.noise != "none" and args.noise_rate == 0:
        raise UsageError(f"--noise {args.noise} needs --noise-rate > 0 (the fraction of labels to corrupt)")
    if args.noise == "asym":
        key = "mnist" if args.dataset == "mnist-5k" else args.dataset
        if key not in ASYM_MAPS:
            raise UsageError(f"--noise asym flips classes by a fixed map, defined for "
                             f"{', '.join(sorted(ASYM_MAPS))} only, not {args.dataset}; use --noise sym")


def check_device(args) -> None:
    try:
        dev = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {args.device!r} is not a device name; use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: this PyTorch cannot use CUDA (a CPU-only build, or no GPU "
                             f"or driver); use --device cpu")
        count = torch.cuda.device_count()
        if (dev.index or 0) >= count or args.nproc > count:
            raise UsageError(f"--device {args.device} --nproc {args.nproc}: this machine has {count} GPU(s)")
    elif dev.type != "cpu":
        raise UsageError(f"--device {args.device}: dps-train runs on cpu or cuda")


def check_backend(args) -> None:
    if args.backend is None:
        return
    from .._dispatch import BACKENDS, available

    if args.backend not in BACKENDS:
        raise UsageError(f"--backend {args.backend!r}: choose one of {', '.join(BACKENDS)} (or leave it out)")
    if not available(args.backend, torch.device(args.device)):
        raise UsageError(f"--backend {args.backend} is not available for --device {args.device} here; "
                         f"leave --backend out to pick automatically")


def check_run_flags(args) -> None:
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: --resume continues the run in --out, "
                         "--overwrite deletes it; give one")
    if args.tau_e == "auto" and args.tau_e_adapt:
        raise UsageError(f"--tau-e auto and --tau-e-adapt {args.tau_e_adapt} both set tau_e; give one")
    if args.stop_after and args.stop_after >= args.epochs:
        raise UsageError(f"--stop-after {args.stop_after} must be below --epochs {args.epochs} (it pauses a run "
                         f"of --epochs epochs after that many; 0 = do not pause)")


def importable(module: str) -> bool:
    """Whether ``import module`` would find it, without importing it (a module set to None in
    sys.modules, as tests do to simulate its absence, counts as missing)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def needed_packages(args) -> list:
    """[(module, what needs it)] for the run these arguments describe."""
    need = []
    if args.dataset == "digits" or args.train_subset or args.ood == "digits":
        need.append(("sklearn", f"--dataset {args.dataset}" if args.dataset == "digits" else "--train-subset"))
    if args.plots:
        need.append(("matplotlib", "the plots (reliability.png, curves.png)"))
    if args.dataset.startswith("imagefolder:"):
        need += [("PIL", "--dataset imagefolder:ROOT"), ("torchvision", "--dataset imagefolder:ROOT")]
    lib = args.model.split(":", 1)[0] if ":" in args.model else None
    if lib in ("torchvision", "timm"):
        need.append((lib, f"--model {args.model}"))
    return need


def check_dependencies(args) -> None:
    """Every optional package the run needs, before anything starts: one line with the install command."""
    for module, why in needed_packages(args):
        if not importable(module):
            extra = "; or pass --no-plots" if module == "matplotlib" else ""
            raise UsageError(f"{why} needs the package {HINTS[module]}, which is not installed "
                             f"(pip install {HINTS[module]}){extra}")


def check_model_name(args) -> None:
    lib, colon, name = args.model.partition(":")
    if not colon and args.model not in BUILT_IN_MODELS:
        raise UsageError(f"--model {args.model!r}: choose {', '.join(BUILT_IN_MODELS)}, torchvision:NAME or "
                         f"timm:NAME")
    if colon and (lib not in ("torchvision", "timm") or not name):
        raise UsageError(f"--model {args.model!r}: give torchvision:NAME or timm:NAME (e.g. torchvision:resnet50)")
    if lib == "torchvision" and importable("torchvision"):
        from .vision import check_torchvision_name

        check_torchvision_name(name)  # before any data is read
    if args.cifar_stem and lib != "torchvision":
        raise UsageError("--cifar-stem changes a torchvision ResNet's first layers; use it with "
                         "--model torchvision:resnet18 (or another torchvision ResNet)")


def check_args(args) -> None:
    """Every argument, before anything is read or written."""
    for name in RANGES:
        check_range(name, getattr(args, name))
    check_model_name(args)
    check_dependencies(args)
    check_noise(args)
    check_device(args)
    check_backend(args)
    check_run_flags(args)
    if not args.out.strip():
        raise UsageError("--out is empty; give the folder for the run's files")

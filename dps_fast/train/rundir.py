"""Run folders: never overwrite a run by accident, resume only the same experiment.

A run of one method lives in ``<out>/<method>/``. A new run refuses a folder that
already holds a run unless given ``--overwrite`` (which deletes the trainer's files
there first); ``--resume`` needs a checkpoint and continues only when every setting
that changes results (``RESULT_KEYS``, plus the method's own ``METHOD_KEYS``) and the
data fingerprint match the checkpoint's saved config. ``--epochs`` is one of them:
the cosine learning-rate schedule (and the pskd/te ramps) span ``--epochs``, so a
longer run is a different run; to train in parts use ``--stop-after``.

Where and how a run computes (``RUNTIME_KEYS``: device, backend, threads, processes,
bank placement, evaluation cadence, output options) may change between the parts of a
run; each part is recorded in ``segments`` of the checkpoint and final.json.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys

import torch

from .errors import UsageError

# Settings that change what is trained or what its results mean.
RESULT_KEYS = ("method", "dataset", "train_subset", "ood", "model", "width", "blocks", "epochs", "batch_size",
               "optimizer", "lr", "momentum", "weight_decay", "augment", "seed", "noise", "noise_rate",
               "noise_seed", "image_size", "cifar_stem", "amp")
_DPS_KEYS = ("c", "eps", "gamma", "tau_e", "tau_e_adapt", "bank_dtype", "top_k")
METHOD_KEYS = {"ce": (), "ls": ("ls_eps",), "pskd": ("pskd_alpha",), "te": ("te_beta", "te_weight"),
               "dps": _DPS_KEYS, "dps+con": _DPS_KEYS + ("con_weight", "con_tau", "con_positives", "proj_dim")}
# Settings of where and how it runs: free to change on resume.
RUNTIME_KEYS = ("data_root", "backend", "nproc", "bank", "device", "threads", "out", "plots", "progress",
                "eval_batch", "eval_every", "overwrite", "debug", "stop_after", "world", "label_issues",
                # the augmentation of a sample is seeded by its index, not its worker; the data
                # fingerprint covers the files that --bad-images / --check-images leave in
                "workers", "bad_images", "check_images", "channels_last", "compile", "export_soft_labels")
NOT_SAVED = ("compare", "demo", "resume", "preset", "dry_run")  # how the command was phrased, not the run
DATA_KEY = "data_sha"

# What the trainer writes into a run folder (--overwrite deletes exactly these).
RUN_FILES = ("checkpoint.pt", "config.json", "metrics.csv", "final.json", "reliability.png", "curves.png",
             "noisy_labels.pt", "label_issues.csv", "soft_labels.safetensors", "data_split.json")


def compared_keys(method: str) -> tuple:
    return RESULT_KEYS + METHOD_KEYS[method]


def config_differences(saved: dict, new: dict, method: str, defaults: dict) -> list[str]:
    """'key: saved -> new' for every result-changing setting that differs (a key missing
    from an older checkpoint counts as its default)."""
    out = []
    for k in compared_keys(method) + (DATA_KEY,):
        if k == DATA_KEY and (k not in saved or k not in new):
            continue
        old = saved.get(k, defaults.get(k))
        if old != new.get(k):
            out.append(f"{k}: {old!r} -> {new.get(k)!r}")
    return out


def holds_run(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, f)) for f in ("checkpoint.pt", "final.json"))


def delete_run(folder: str) -> None:
    """Removes the trainer's files (and the per-rank bank folder) from ``folder``; nothing else."""
    for f in RUN_FILES:
        p = os.path.join(folder, f)
        if os.path.exists(p):
            os.remove(p)
    shutil.rmtree(os.path.join(folder, "bank"), ignore_errors=True)


def load_saved(ckpt: str) -> dict:
    try:
        return torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say which, not a pickle traceback
        raise UsageError(f"{ckpt} cannot be read as a dps-train checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); move it away or use --overwrite") from e


def saved_progress(st: dict) -> str:
    done = st["epoch"] + 1
    part = st.get("partial")
    extra = f", {part['done']} batches into epoch {part['epoch'] + 1}" if part else ""
    return f"{done}/{st['config'].get('epochs', '?')} epochs{extra}"


def resume_command(argv: list[str] | None) -> str:
    """The command that continues this one: the same arguments, --resume instead of --overwrite."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if a not in ("--overwrite", "--resume")] + ["--resume"]
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    head = ["dps-train"] if prog == "dps-train" else [os.path.basename(sys.executable), "-m", "dps_fast.train"]
    return shlex.join(head + argv)


def bank_storage(cfg: dict) -> str:
    """Where a DPS run keeps its bank between epochs; resume cannot convert between these
    (per-rank files re-shard to any --nproc > 1)."""
    if cfg.get("world", 1) > 1:
        return "per-rank files (--nproc > 1)"
    return "host memory (--bank host)" if cfg.get("bank") == "host" else "checkpoint.pt (one process)"


def _check_resumable(ckpt: str, saved: dict, new: dict, method: str, defaults: dict) -> None:
    diffs = config_differences(saved, new, method, defaults)
    if diffs:
        raise UsageError(f"--resume: {ckpt} was trained with other settings ({'; '.join(diffs)}); resume with "
                         f"the saved settings, or start a new run with --overwrite or another --out")
    if method in ("dps", "dps+con") and bank_storage(saved) != bank_storage(new):
        raise UsageError(f"--resume: {ckpt} keeps its DPS bank in {bank_storage(saved)}, this run would use "
                         f"{bank_storage(new)}; resume with the saved --nproc/--bank")


def plan_runs(args, methods: list, configs: dict, defaults: dict) -> dict:
    """method -> (what to do: 'fresh' | 'overwrite' | 'resume' | 'complete', saved config or None).
    Raises UsageError, before anything is written, for a folder that would be overwritten
    without --overwrite, a --resume with no checkpoint at all, or a changed setting."""
    plans, occupied = {}, []
    for m in methods:
        folder = os.path.join(args.out, m)
        ckpt = os.path.join(folder, "checkpoint.pt")
        if args.resume and os.path.exists(ckpt):
            st = load_saved(ckpt)
            _check_resumable(ckpt, st["config"], configs[m], m, defaults)
            done = st["epoch"] + 1 >= args.epochs and not st.get("partial")
            plans[m] = ("complete" if done else "resume", st["config"])
        elif holds_run(folder) and not args.overwrite:
            occupied.append(folder)
        else:
            plans[m] = ("overwrite" if holds_run(folder) else "fresh", None)
    compare = os.path.join(args.out, "compare.json")
    if len(methods) > 1 and os.path.exists(compare) and not (args.resume or args.overwrite):
        occupied.append(compare)
    if occupied:
        raise UsageError(f"{', '.join(occupied)} already hold{'s' if len(occupied) == 1 else ''} a run; continue "
                         f"it with --resume, replace it with --overwrite, or choose another --out")
    if args.resume and not any(kind in ("resume", "complete") for kind, _ in plans.values()):
        folders = ", ".join(os.path.join(args.out, m) for m in methods)
        raise UsageError(f"--resume: no checkpoint.pt in {folders} (is --out right?); to start a new run, "
                         f"leave out --resume")
    return plans


def check_data(plans: dict, digest: str, out: str) -> None:
    """After the data is loaded: a resumed run must see the same data as before."""
    for m, (kind, saved) in plans.items():
        if saved is not None and DATA_KEY in saved and saved[DATA_KEY] != digest:
            raise UsageError(f"--resume: the data differ from those {os.path.join(out, m)} was trained on "
                             f"(fingerprint {saved[DATA_KEY]} -> {digest}: a changed file, --data-root or "
                             f"subset); resume with the same data, or start a new run with --overwrite")


def clear_for_overwrite(args, plans: dict) -> None:
    for m, (kind, _) in plans.items():
        if kind == "overwrite":
            delete_run(os.path.join(args.out, m))
    if args.overwrite:
        compare = os.path.join(args.out, "compare.json")
        if os.path.exists(compare):
            os.remove(compare)

"""Post-hoc temperature scaling of finished `dps-train` runs.

    python tools/posthoc_temperature.py runs/grid --out runs/grid/temperature.json

For every run folder under the given roots (a folder with config.json and
checkpoint.pt), it rebuilds the model from the final checkpoint and fits one
temperature T on a held-out validation set by minimising the NLL: 5,000
training images that are not in the run's training subset, with their clean
labels. It then reports test accuracy (unchanged by T), ECE (15 bins), NLL and
Brier before and after scaling. Temperature scaling is the standard post-hoc
fix for over-confidence (T > 1) and under-confidence (T < 1); it tells apart a
model that ranks well but is mis-scaled from one whose probabilities are poor.

Needs a training subset (`--train-subset`), so that held-out images exist.
"""
import argparse
import glob
import json
import math
import os
import warnings
import sys

import torch

from dps_fast import metrics as M
from dps_fast.calibration import bank_transition, fit_temperature, posterior_temperature
from dps_fast.train.data import load_dataset, stratified_subset
from dps_fast.train import ExperimentData, model_from_args
from dps_fast.train.noise import inject_noise


def _logits(model, x, batch=1024):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def _summary(logits, y, t=1.0):
    p = torch.softmax(logits / t, -1)
    r = M.summary(p, y)
    return {"accuracy": r["accuracy"], "ece_pct": 100 * r["ece"], "nll": r["nll"], "brier": r["brier"]}


def heldout_images(args, data, n_val: int):
    """``n_val`` training images outside the run's ``--train-subset`` (stratified, seed 1),
    standardised like the run's data, with their clean labels."""
    ds = load_dataset(args.dataset, getattr(args, "data_root", None), seed=0)
    keep = stratified_subset(ds.y_train, args.train_subset, seed=0)
    rest = torch.ones(len(ds.y_train), dtype=torch.bool)
    rest[keep] = False
    rest = rest.nonzero().squeeze(1)
    val = rest[stratified_subset(ds.y_train[rest], n_val, seed=1)]
    return data.norm(ds.x_train[val]), ds.y_train[val]


def noisy_heldout_labels(args, y_val, num_classes: int):
    """The held-out labels with the run's noise (kind and rate) drawn anew (noise seed + 1):
    a noisy validation split, as a user without clean data would have one."""
    if args.noise == "none" or not args.noise_rate:
        return y_val
    return inject_noise(y_val, num_classes, args.noise, args.noise_rate, args.noise_seed + 1,
                        dataset=args.dataset)[0]


def no_clean_data_fits(z_val, y_noisy, z_train=None, posterior_means=None, train_labels=None) -> dict:
    """Temperatures fitted without clean labels: on the noisy held-out labels; and, given a
    DPS bank, on the training samples against the posterior means (soft or argmax), and on
    the noisy held-out / training labels through the noise transition the bank estimates."""
    out = {"noisy_val": fit_temperature(z_val, y_noisy)}
    if posterior_means is not None:
        m = bank_transition(posterior_means, train_labels)
        warnings.filterwarnings("ignore", "posterior_temperature is deprecated", DeprecationWarning)  # measured here
        out.update(posterior=posterior_temperature(z_train, posterior_means),
                   posterior_hard=posterior_temperature(z_train, posterior_means, hard=True),
                   noisy_val_bank=fit_temperature(z_val, y_noisy, transition=m),
                   train_bank=fit_temperature(z_train, train_labels, transition=m))
    return out


def run_one(folder: str, n_val: int, cache: dict) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    if not cfg.get("train_subset"):
        raise ValueError(f"{folder}: no --train-subset, so no held-out training images to fit T on")
    args = argparse.Namespace(**cfg)
    key = (cfg["dataset"], cfg["train_subset"], cfg["noise"], cfg["noise_rate"], cfg["noise_seed"])
    if key not in cache:
        data = ExperimentData(args)
        cache[key] = (data, *heldout_images(args, data, n_val))
    data, x_val, y_val = cache[key]
    model = model_from_args(args, data)
    st = torch.load(os.path.join(folder, "checkpoint.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(st["model"])
    z_val = _logits(model, x_val)
    t = fit_temperature(z_val, y_val)
    z_test = _logits(model, data.x_test)
    bank = st.get("method", {}).get("alpha")
    post = None if bank is None else (bank.float() / bank.float().sum(1, keepdim=True))
    fits = no_clean_data_fits(z_val, noisy_heldout_labels(args, y_val, data.num_classes),
                              _logits(model, data.x_train) if post is not None else None, post, data.labels)
    return {"run": folder, "method": cfg["method"], "noise": cfg["noise"], "seed": cfg["seed"], "epoch": st["epoch"],
            "temperature": t, "before": _summary(z_test, data.y_test), "after": _summary(z_test, data.y_test, t),
            "no_clean_data": {k: {"T": v, **_summary(z_test, data.y_test, v)} for k, v in fits.items()}}


def table(records) -> str:
    """Markdown: mean ± std over seeds per (noise, method) of T and of ECE / NLL before -> after."""
    def ms(xs):
        m = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
        return m, sd
    groups = {}
    for r in records:
        setting = r["run"].rstrip("/").split("/")[-3] if r["run"].count("/") >= 3 else r["noise"]
        groups.setdefault((setting, r["method"]), []).append(r)
    lines = ["| setting | method | seeds | T | ECE % before | ECE % after T | NLL before | NLL after T |",
             "|---|---|---|---|---|---|---|---|"]
    s_order = {k: i for i, k in enumerate(["none", "clean", "sym", "sym40", "asym", "asym40"])}
    m_order = {k: i for i, k in enumerate(["ce", "ls", "pskd", "te", "dps", "dps+con"])}
    for (setting, method), rs in sorted(groups.items(), key=lambda kv: (s_order.get(kv[0][0], 99), kv[0][0],
                                                                         m_order.get(kv[0][1], 99), kv[0][1])):
        cols = [ms([r["temperature"] for r in rs]), ms([r["before"]["ece_pct"] for r in rs]),
                ms([r["after"]["ece_pct"] for r in rs]), ms([r["before"]["nll"] for r in rs]),
                ms([r["after"]["nll"] for r in rs])]
        fmt = ["{:.2f} ± {:.2f}", "{:.2f} ± {:.2f}", "{:.2f} ± {:.2f}", "{:.3f} ± {:.3f}", "{:.3f} ± {:.3f}"]
        lines.append(f"| {setting} | {method} | {len(rs)} | " + " | ".join(f.format(*c) for f, c in zip(fmt, cols)) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="+", help="folders searched for run folders (config.json + checkpoint.pt)")
    p.add_argument("--out", required=True, help="JSON file with one record per run")
    p.add_argument("--n-val", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table-only", action="store_true", help="print the markdown table of an existing --out")
    a = p.parse_args()
    if a.table_only:
        with open(a.out) as fh:
            print(table(json.load(fh)))
        return
    torch.set_num_threads(a.threads)
    folders = sorted({os.path.dirname(c) for r in a.roots
                      for c in glob.glob(os.path.join(r, "**", "checkpoint.pt"), recursive=True)
                      if os.path.exists(os.path.join(os.path.dirname(c), "final.json"))})
    if not folders:
        sys.exit(f"no finished runs (final.json + checkpoint.pt) under {a.roots}")
    cache, out = {}, []
    for k, f in enumerate(folders, 1):
        r = run_one(f, a.n_val, cache)
        out.append(r)
        b, s = r["before"], r["after"]
        print(f"[{k}/{len(folders)}] {f}: T={r['temperature']:.3f}  ECE {b['ece_pct']:.2f} -> {s['ece_pct']:.2f}"
              f"  NLL {b['nll']:.4f} -> {s['nll']:.4f}", flush=True)
    with open(a.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(table(out))


if __name__ == "__main__":
    main()

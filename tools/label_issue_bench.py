"""Label-issue detection: DPS's posterior from one run against cleanlab (issue #13).

    nice -n 19 .venv/bin/python tools/label_issue_bench.py train --out runs/label-issues
    .venv/bin/python tools/label_issue_bench.py analyse --out runs/label-issues \\
        --doc results/label-issues.md

``train`` runs every training the comparison needs, one at a time on one thread,
and saves what each produced under ``<out>/<setting>/s<seed>/<job>.pt``; a job whose
file exists is skipped (the sweep resumes where it stopped). Per setting and seed:

- ``dps``: one DPS run (``DPSLoss`` defaults); keeps the final bank.
- ``ce``: one cross-entropy run on the noisy labels; keeps its in-sample
  probabilities of the training set (what cleanlab's docs warn against).
- ``fold0..4``: cross-entropy on 4/5 of the data (stratified 5-fold on the noisy
  labels); keeps the out-of-sample probabilities of the held-out fifth.
- ``soft``: a fresh model distilled from the DPS soft labels, exported with
  ``dps_fast.soft_labels`` and loaded back (``soft_cross_entropy``).
- ``clean-remove`` / ``clean-relabel``: cross-entropy after removing, or relabelling
  to the suggested class, the issues DPS flags with its defaults.

``analyse`` scores every method against the known flip mask and writes the table,
the precision-recall plot and a JSON of every number.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import dps_fast
from dps_fast import metrics as M
from dps_fast.train.data import load_dataset, stratified_subset
from dps_fast.train.models import build_model
from dps_fast.train.noise import inject_noise

SETTINGS = {"sym20": ("sym-exclusive", 0.2), "sym40": ("sym-exclusive", 0.4), "asym40": ("asym", 0.4)}
FOLDS = 5
BASE_JOBS = ("dps", "ce") + tuple(f"fold{k}" for k in range(FOLDS))
DERIVED_JOBS = ("soft", "clean-remove", "clean-relabel")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("phase", choices=["train", "analyse"])
    p.add_argument("--out", default="runs/label-issues")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", default="base", help="base | derived | all | a comma-separated list")
    p.add_argument("--subset", type=int, default=10000, help="stratified Fashion-MNIST training subset")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--width", type=int, default=128, help="MLP hidden width (2 hidden layers)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--doc", default=None, help="analyse: markdown file whose <!-- tables --> ... <!-- /tables --> "
                   "section is rewritten; every number goes to the same name with .json")
    p.add_argument("--plot", default=None, help="analyse: precision-recall plot (PNG)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------- data
def load_data(subset: int) -> dict:
    ds = load_dataset("fashion-mnist")
    keep = stratified_subset(ds.y_train, subset, seed=0) if subset < len(ds.y_train) else None
    x, y = (ds.x_train[keep], ds.y_train[keep]) if keep is not None else (ds.x_train, ds.y_train)
    mean, std = float(x.mean()), float(x.std())
    return {"x": (x - mean) / std, "clean": y.long(), "x_test": (ds.x_test - mean) / std,
            "y_test": ds.y_test.long(), "C": ds.num_classes}


def noisy_labels(data: dict, setting: str, seed: int) -> torch.Tensor:
    kind, rate = SETTINGS[setting]
    noisy, _ = inject_noise(data["clean"], data["C"], kind, rate, seed=12345 + seed, dataset="fashion-mnist")
    return noisy


def folds_of(labels: torch.Tensor, seed: int) -> list:
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    return [torch.as_tensor(te) for _, te in skf.split(np.zeros(len(labels)), labels.numpy())]


# ---------------------------------------------------------------------------------------- training
@torch.no_grad()
def predict(model, x, batch=2048) -> torch.Tensor:
    model.eval()
    return torch.cat([torch.softmax(model(x[i:i + batch]), -1) for i in range(0, len(x), batch)])


def fit(args, data, rows: torch.Tensor, seed: int, loss_fn) -> tuple:
    """Trains a fresh MLP on training rows ``rows``; ``loss_fn(logits, ids)`` gives the
    loss of a batch of row ids. Returns (model, seconds)."""
    torch.manual_seed(seed)
    model = build_model("mlp", tuple(data["x"].shape[1:]), data["C"], hidden=args.width)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        order = rows[torch.randperm(len(rows), generator=gen)]
        for k in range(0, len(order), args.batch_size):
            ids = order[k:k + args.batch_size]
            loss = loss_fn(model(data["x"][ids]), ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model, time.perf_counter() - t0


def test_metrics(model, data) -> dict:
    s = M.summary(predict(model, data["x_test"]), data["y_test"])
    return {"accuracy": s["accuracy"], "ece_pct": 100 * s["ece"], "nll": s["nll"]}


def hard_ce(labels):
    return lambda logits, ids: F.cross_entropy(logits, labels[ids])


def job_dps(args, data, labels, seed):
    loss = dps_fast.DPSLoss(labels, data["C"], tau_e=1.0)  # as published in results/label-issues.md
    model, secs = fit(args, data, torch.arange(len(labels)), seed, lambda z, ids: loss(z, ids))
    return {"alpha": loss.alpha.clone(), "train_probs": predict(model, data["x"]), "seconds": secs,
            "test": test_metrics(model, data), "dps": {"c": 100.0, "eps": 1e-2, "gamma": loss.gamma}}


def job_ce(args, data, labels, seed):
    model, secs = fit(args, data, torch.arange(len(labels)), seed, hard_ce(labels))
    return {"train_probs": predict(model, data["x"]), "seconds": secs, "test": test_metrics(model, data)}


def job_fold(k):
    def job(args, data, labels, seed):
        held = folds_of(labels, seed)[k]
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[held] = False
        model, secs = fit(args, data, keep.nonzero().flatten(), seed, hard_ce(labels))
        return {"held": held, "held_probs": predict(model, data["x"][held]), "seconds": secs}
    return job


def run_dir(args, setting, seed) -> str:
    return os.path.join(args.out, setting, f"s{seed}")


def load_job(args, setting, seed, job) -> dict:
    return torch.load(os.path.join(run_dir(args, setting, seed), f"{job}.pt"), weights_only=False)


def job_soft(args, data, labels, seed, setting):
    from dps_fast.soft_labels import export_soft_labels, load_soft_labels

    d = load_job(args, setting, seed, "dps")
    path = os.path.join(run_dir(args, setting, seed), "soft_labels.safetensors")
    export_soft_labels(d["alpha"], path, given_labels=labels, gamma=d["dps"]["gamma"], c=d["dps"]["c"],
                       eps=d["dps"]["eps"], epoch=args.epochs, dtype=torch.float16)
    targets = load_soft_labels(path).targets()
    model, secs = fit(args, data, torch.arange(len(labels)), seed,
                      lambda z, ids: dps_fast.soft_cross_entropy(z, targets[ids]))
    return {"seconds": secs, "test": test_metrics(model, data), "bytes": os.path.getsize(path)}


def job_clean(relabel: bool):
    def job(args, data, labels, seed, setting):
        from dps_fast.label_issues import find_label_issues

        d = load_job(args, setting, seed, "dps")
        issues = find_label_issues(d["alpha"], labels, prior_params=d["dps"])  # the defaults: margin, estimated rate
        if relabel:
            fixed = labels.clone()
            fixed[issues.indices] = issues.suggested_labels
            rows = torch.arange(len(labels))
        else:
            fixed, keep = labels, torch.ones(len(labels), dtype=torch.bool)
            keep[issues.indices] = False
            rows = keep.nonzero().flatten()
        model, secs = fit(args, data, rows, seed, hard_ce(fixed))
        return {"seconds": secs, "test": test_metrics(model, data), "flagged": len(issues.indices),
                "labels_wrong_after": float((fixed[rows] != data["clean"][rows]).float().mean())}
    return job


JOBS = {"dps": job_dps, "ce": job_ce, **{f"fold{k}": job_fold(k) for k in range(FOLDS)},
        "soft": job_soft, "clean-remove": job_clean(False), "clean-relabel": job_clean(True)}


def job_list(spec: str) -> list:
    if spec in ("base", "derived", "all"):
        return list({"base": BASE_JOBS, "derived": DERIVED_JOBS, "all": BASE_JOBS + DERIVED_JOBS}[spec])
    jobs = [j.strip() for j in spec.split(",") if j.strip()]
    bad = [j for j in jobs if j not in JOBS]
    if bad:
        raise SystemExit(f"unknown jobs {bad}; choose from {list(JOBS)}")
    return jobs


def train(args) -> None:
    data = load_data(args.subset)
    for seed in map(int, args.seeds.split(",")):  # seed-major: an interrupted sweep has whole seeds
        for setting in args.settings.split(","):
            folder = run_dir(args, setting, seed)
            os.makedirs(folder, exist_ok=True)
            labels = noisy_labels(data, setting, seed)
            for job in job_list(args.jobs):
                path = os.path.join(folder, f"{job}.pt")
                if os.path.exists(path):
                    continue
                fn = JOBS[job]
                res = fn(args, data, labels, seed, setting) if job in DERIVED_JOBS else fn(args, data, labels, seed)
                res.update(job=job, setting=setting, seed=seed, config=vars(args))
                torch.save(res, path + ".tmp")
                os.replace(path + ".tmp", path)
                print(f"{setting} s{seed} {job}: {res['seconds']:.1f} s "
                      f"{json.dumps(res.get('test', {}))}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.phase == "train":
        train(args)
    else:
        from label_issue_analysis import analyse  # noqa: E402  (tools/ sibling)

        analyse(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

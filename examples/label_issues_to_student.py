"""From a dps-train run to its products: train -> flag label issues -> export soft labels ->
retrain a student on them.

1. Your data as an .npz (here scikit-learn's digits, with 15% of the labels deliberately
   wrong, and no x_test: dps-train holds out 20% and writes data_split.json).
2. ``dps-train --label-issues --export-soft-labels``: label_issues.csv ranks the likely
   wrong labels by *your* row ids; soft_labels.safetensors holds the DPS posterior mean
   of every training sample (row k = training sample k = npz row train_rows[k]).
3. A student (a fresh MLP, plain PyTorch) trained on the soft labels with the flagged
   samples dropped, evaluated on the held-out rows.

Run: ``python examples/label_issues_to_student.py [--out DIR] [--epochs N]``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from dps_fast import load_soft_labels
from dps_fast.train.cli import main as dps_train


def write_noisy_digits(path: str, rate: float = 0.15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """digits as x [N, 8, 8] in [0, 1] and y with ``rate`` of the labels changed; returns the
    changed rows and the true labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    y = d.target.copy()
    flipped = rng.choice(len(y), int(rate * len(y)), replace=False)
    y[flipped] = (y[flipped] + rng.integers(1, 10, len(flipped))) % 10
    np.savez(path, x=(d.images / 16.0).astype(np.float32), y=y)
    return np.sort(flipped), d.target


def teacher_run(npz: str, out: str, epochs: int) -> str:
    argv = ["--dataset", f"npz:{npz}", "--model", "mlp", "--width", "128", "--epochs", str(epochs),
            "--batch-size", "64", "--lr", "0.05", "--weight-decay", "0", "--no-augment", "--method", "dps",
            "--label-issues", "--export-soft-labels", "--no-plots", "--no-progress", "--out", out, "--overwrite"]
    if dps_train(argv) != 0:
        sys.exit("the teacher run failed")
    return os.path.join(out, "dps")


def flagged_rows(run_dir: str) -> list:
    with open(os.path.join(run_dir, "label_issues.csv")) as f:
        return [int(r["index"]) for r in csv.DictReader(f)]


def train_student(x, targets, epochs: int, seed: int = 0) -> torch.nn.Module:
    """A fresh MLP fitted to soft targets (cross-entropy against distributions)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            loss = -(targets[idx] * F.log_softmax(net(x[idx]), -1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/student")
    p.add_argument("--epochs", type=int, default=20)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    npz = os.path.join(a.out, "noisy_digits.npz")
    flipped, truth = write_noisy_digits(npz)
    run_dir = teacher_run(npz, os.path.join(a.out, "teacher"), a.epochs)
    split = json.load(open(os.path.join(run_dir, "data_split.json")))
    train_rows, test_rows = np.array(split["train_rows"]), np.array(split["test_rows"])
    flagged = flagged_rows(run_dir)
    hits = len(set(flagged) & set(flipped.tolist()))
    print(f"flagged {len(flagged)} rows; {hits} of them are among the {len(set(flipped) & set(train_rows))} "
          f"training rows whose label we changed")
    soft = load_soft_labels(os.path.join(run_dir, "soft_labels.safetensors")).targets().float()
    with np.load(npz) as z:
        x = torch.from_numpy(z["x"])
    keep = torch.tensor([k for k, r in enumerate(train_rows) if r not in set(flagged)])
    student = train_student(x[train_rows][keep], soft[keep], a.epochs)
    with torch.no_grad():  # scored against the true digits of the held-out rows
        pred = student(x[test_rows]).argmax(1)
    acc = float((pred == torch.from_numpy(truth)[test_rows]).float().mean())
    result = {"flagged": len(flagged), "flagged_and_changed": hits, "student_test_accuracy": acc,
              "kept_training_samples": len(keep), "training_samples": len(train_rows)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

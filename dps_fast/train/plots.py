"""Plots of one run: the reliability diagram and the training curves."""
from __future__ import annotations

import os

import torch

from .. import metrics as M

N_BINS = 15


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS):
    """Per-bin (accuracy, mean confidence, count) over equal-width confidence bins,
    right-closed as in docs/method.md (Metrics)."""
    conf, pred = probs.max(1)
    hit = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1)
    idx = torch.bucketize(conf.double(), edges[1:-1].double(), right=False)
    accs, confs, counts = [], [], []
    for b in range(n_bins):
        sel = idx == b
        counts.append(int(sel.sum()))
        accs.append(float(hit[sel].mean()) if sel.any() else 0.0)
        confs.append(float(conf[sel].double().mean()) if sel.any() else 0.0)
    return edges, accs, confs, counts


def save_reliability(out_dir: str, probs: torch.Tensor, labels: torch.Tensor, title: str) -> None:
    plt = _pyplot()
    edges, accs, confs, counts = reliability_bins(probs, labels)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    centers = ((edges[:-1] + edges[1:]) / 2).numpy()
    ax.bar(centers, accs, width=1 / N_BINS, edgecolor="k", alpha=0.8, label="accuracy")
    ax.bar(centers, [c - a if n else 0 for a, c, n in zip(accs, confs, counts)], bottom=accs,
           width=1 / N_BINS, color="tab:red", alpha=0.3, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ece = 100 * M.ece(probs, labels, N_BINS)
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"{title}\nECE {ece:.2f}% ({N_BINS} bins)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "reliability.png"), dpi=100)
    plt.close(fig)


def save_curves(out_dir: str, history: list, title: str) -> None:
    plt = _pyplot()
    ep = [h["epoch"] for h in history]
    fig, axs = plt.subplots(1, 3, figsize=(12, 3.5))
    axs[0].plot(ep, [h["train_loss"] for h in history])
    axs[0].set(title="train loss", xlabel="epoch")
    ev = [h for h in history if "accuracy" in h]
    axs[1].plot([h["epoch"] for h in ev], [100 * h["accuracy"] for h in ev], label="test")
    axs[1].plot(ep, [100 * h["train_acc"] for h in history], label="train (given labels)")
    axs[1].set(title="accuracy %", xlabel="epoch")
    axs[1].legend()
    axs[2].plot([h["epoch"] for h in ev], [h["ece_pct"] for h in ev])
    axs[2].set(title=f"test ECE % ({N_BINS} bins)", xlabel="epoch")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=100)
    plt.close(fig)


def save_plots(out_dir: str, history: list, probs: torch.Tensor, labels: torch.Tensor, title: str) -> None:
    save_reliability(out_dir, probs, labels, title)
    save_curves(out_dir, history, title)

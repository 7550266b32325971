"""Plots of one run: the reliability diagram and the training curves."""
from __future__ import annotations

import os

import torch

from .. import metrics

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


RELIABILITY_NOTE = ("bars: accuracy of the images whose top confidence falls in the bin; n: images in the bin. "
                    "red: over-confident (confidence above accuracy), blue: under-confident. "
                    "Faded bins hold < 1% of the images: their gaps are noise.")


def save_reliability(out_dir: str, probs: torch.Tensor, labels: torch.Tensor, title: str) -> dict:
    """Reliability diagram with the per-bin counts and a note on the colours (RELIABILITY_NOTE);
    returns the texts it drew: the counts, the legend and the note."""
    plt = _pyplot()
    edges, accs, confs, counts = reliability_bins(probs, labels)
    total = max(1, sum(counts))
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(5, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centers = ((edges[:-1] + edges[1:]) / 2).numpy()
    w = 1 / N_BINS
    for x, a, c, n in zip(centers, accs, confs, counts):
        if not n:
            continue
        alpha = 0.85 if n >= 0.01 * total else 0.3
        ax.bar(x, a, width=w, edgecolor="k", color="tab:gray", alpha=alpha)
        ax.bar(x, c - a, bottom=a, width=w, color="tab:red" if c > a else "tab:blue", alpha=0.45 * alpha / 0.85)
        ax.text(x, min(max(a, c), 0.97) + 0.01, f"{n}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    handles = [plt.Rectangle((0, 0), 1, 1, color=col, alpha=al) for col, al in
               (("tab:gray", 0.85), ("tab:red", 0.45), ("tab:blue", 0.45))]
    legend = ["accuracy (n = images in bin)", "over-confident gap", "under-confident gap"]
    ax.legend(handles, legend, loc="upper left", fontsize=7)
    ece = 100 * metrics.ece(probs, labels, N_BINS)
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.08), title=f"{title}\nECE {ece:.2f}% ({N_BINS} bins)")
    axn.bar(centers, counts, width=w, edgecolor="k", color="tab:gray")
    axn.set(xlabel="confidence (top softmax probability)", ylabel="images (log)")
    if any(counts):
        axn.set_yscale("log")
        axn.set_ylim(0.8, 2 * max(counts))  # bars of one image stay visible
    fig.text(0.5, 0.005, RELIABILITY_NOTE, ha="center", va="bottom", fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(os.path.join(out_dir, "reliability.png"), dpi=100)
    texts = {"counts": [t.get_text() for t in ax.texts], "legend": legend, "note": RELIABILITY_NOTE}
    plt.close(fig)
    return texts


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

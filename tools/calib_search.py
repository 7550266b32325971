"""Search for a calibrated DPS under label noise (issue #15), outside the library.

    python tools/calib_search.py --setting sym40 --method dps --tau-t 0.7 --out runs/calib
    python tools/calib_search.py --table runs/calib          # markdown table of every record

A compact copy of `dps-train`'s single-process loop (same data, subset, noise,
model, optimiser, schedule, seeds and batch order, no augmentation), with an
experimental DPS loss in plain PyTorch whose candidate remedies are options:

    e      = mean_v softmax(z_v / tau_e)                       (evidence; with --adapt k, tau_e = 1 - k eta
                                                                at each epoch, eta the bank's noise estimate)
    alpha <- gamma * alpha + w(epoch) * e                      (w: evidence-mass schedule)
    t      = alpha / sum(alpha)                                (posterior mean, after the update)
    t      = t^(1/tau_t) / sum(t^(1/tau_t))                    (target temperature)
    t      = (1 - r) t + r sharpen(t, plc_tau),                (ProSelfLC-style, entropy adaptive:
             r = g(epoch) (1 - H(t) / log C)                    trust a sharpened target more as H drops)
    loss   = mean CE(softmax(z), t)

With every option at its default the loss is the library's DPS step (docs/method.md,
"What one training step computes"); `--loss library` trains with dps_fast.DPSLoss
instead, to check the two agree. Each run writes one JSON record: test accuracy,
ECE (15 bins), NLL, OOD AUROC, and the same after a temperature fitted three ways:
on clean held-out images (tools/posthoc_temperature.py's set), on the same images
with noisy labels, and on the training samples against the bank (no clean data;
dps_fast.calibration.posterior_temperature).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from posthoc_temperature import heldout_images, no_clean_data_fits, noisy_heldout_labels  # noqa: E402

from dps_fast import metrics as M  # noqa: E402
from dps_fast.calibration import fit_temperature  # noqa: E402
from dps_fast.train import ExperimentData, model_from_args  # noqa: E402
from dps_fast.train.data import Loader  # noqa: E402

SETTINGS = {"clean": ("none", 0.0), "sym40": ("sym", 0.4), "asym40": ("asym", 0.4)}
NOISE_SEED = 12345  # dps-train's default


# --------------------------------------------------------------------------- the experimental loss
def sharpen(t: torch.Tensor, tau: float) -> torch.Tensor:
    """t^(1/tau), renormalised; tau = 0 gives the one-hot argmax."""
    if tau == 0:
        return F.one_hot(t.argmax(-1), t.shape[-1]).to(t.dtype)
    return torch.softmax(t.clamp_min(1e-30).log() / tau, -1)


class ExperimentalDPS:
    """DPS with the candidate remedies of issue #15 as options (see the module docstring)."""

    def __init__(self, labels: torch.Tensor, num_classes: int, epochs: int, a):
        self.alpha = torch.full((len(labels), num_classes), a.eps)
        self.alpha.scatter_(1, labels[:, None], a.c)
        self.labels, self.a, self.epochs, self.epoch = labels, a, epochs, 0
        self.tau_e, self.history = a.tau_e, []

    def noise_estimate(self) -> dict:
        """The bank's view of the label noise: the fraction of labels its argmax rejects,
        as a symmetric noise rate (x C/(C-1)), and the mean label-error score 1 - t[label]."""
        t = self.posterior_means()
        c = t.shape[1]
        rejected = float((t.argmax(1) != self.labels).double().mean())
        score = float(1 - t.gather(1, self.labels[:, None]).double().mean())
        return {"rejected": rejected, "eta": min(1.0, rejected * c / (c - 1)), "label_error_score": score}

    def start_epoch(self, epoch: int) -> None:
        """Noise-adaptive evidence temperature (--adapt k): tau_e = max(0.1, 1 - k * eta),
        eta the bank's noise estimate at the start of the epoch (0 at the start of training):
        the rejected-label rate (--adapt-from eta) or the mean label-error score (score)."""
        self.epoch = epoch
        est = self.noise_estimate()
        if self.a.adapt:
            key = "eta" if self.a.adapt_from == "eta" else "label_error_score"
            self.tau_e = max(0.1, 1.0 - self.a.adapt * est[key])
        self.history.append({"epoch": epoch, "tau_e": self.tau_e, **est})

    def evidence_weight(self) -> float:
        f = self.epoch / max(1, self.epochs - 1)
        return self.a.w0 + (self.a.w1 - self.a.w0) * f

    def transform(self, t: torch.Tensor) -> torch.Tensor:
        a = self.a
        if a.tau_t != 1.0:
            t = sharpen(t, a.tau_t)
        if a.plc:
            h = -(t * t.clamp_min(1e-30).log()).sum(-1, keepdim=True) / math.log(t.shape[-1])
            g = min(1.0, (self.epoch + 1) / max(1.0, a.plc_ramp * self.epochs))
            r = g * (1 - h).clamp(0, 1)
            t = (1 - r) * t + r * sharpen(t, a.plc_tau)
        return t

    def __call__(self, logits, index, labels):
        with torch.no_grad():
            e = torch.softmax(logits.detach() / self.tau_e, -1)
            row = self.a.gamma * self.alpha[index] + self.evidence_weight() * e
            self.alpha[index] = row
            t = self.transform(row / row.sum(-1, keepdim=True))
        return (torch.logsumexp(logits, -1) - (t * logits).sum(-1)).mean()

    def posterior_means(self) -> torch.Tensor:
        return self.alpha / self.alpha.sum(-1, keepdim=True)

    def state_dict(self):
        return {"alpha": self.alpha, "history": self.history}

    def load_state_dict(self, st):
        self.alpha.copy_(st["alpha"])
        self.history = list(st["history"])


class LibraryDPS(ExperimentalDPS):
    """dps_fast.DPSLoss (the fused kernel), for the check against ExperimentalDPS."""

    def __init__(self, labels, num_classes, epochs, a):
        from dps_fast import DPSLoss

        self.dps = DPSLoss(labels, num_classes, c=a.c, eps=a.eps, gamma=a.gamma, tau_e=a.tau_e)
        self.alpha, self.labels, self.history = self.dps.alpha, labels, []
        self.a = argparse.Namespace(**{**vars(a), "adapt": 0.0, "adapt_from": "eta"})
        self.tau_e = a.tau_e

    def __call__(self, logits, index, labels):
        return self.dps(logits, index)


class CrossEntropy:
    history = []

    def start_epoch(self, epoch: int) -> None:
        pass

    def __call__(self, logits, index, labels):
        return F.cross_entropy(logits, labels)

    def state_dict(self):
        return {}

    def load_state_dict(self, st):
        pass


def build_loss(a, data, epochs):
    if a.method == "ce":
        return CrossEntropy()
    cls = LibraryDPS if a.loss == "library" else ExperimentalDPS
    return cls(data.labels, data.num_classes, epochs, a)


# --------------------------------------------------------------------------- data, model, training
def experiment_args(a) -> argparse.Namespace:
    kind, rate = SETTINGS[a.setting]
    return argparse.Namespace(dataset="fashion-mnist", data_root=None, train_subset=a.train_subset, noise=kind,
                              noise_rate=rate, noise_seed=NOISE_SEED, ood="auto", model=a.model, width=a.width,
                              blocks=a.blocks)


def build(a, data):
    """Model, loss, optimiser, schedule and data-order generator, created in dps-train's order."""
    torch.manual_seed(a.seed)
    model = model_from_args(experiment_args(a), data)
    loss = build_loss(a, data, a.epochs)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, a.epochs))
    gen = torch.Generator().manual_seed(a.seed + 1)
    return model, loss, opt, sched, gen


def train_epoch(model, loss, opt, loader, gen) -> float:
    """One epoch; returns the accuracy on the (noisy) training labels."""
    model.train()
    hits = 0
    for x, y, idx in loader.epoch(gen):
        logits = model(x)
        value = loss(logits, idx, y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        hits += int((logits.detach().argmax(-1) == y).sum())
    return hits / len(loader.y)


def train(a, data, ckpt: str):
    """Trains (resuming from ``ckpt`` if present); returns (model, loss, last train accuracy)."""
    model, loss, opt, sched, gen = build(a, data)
    loader = Loader(data.x_train, data.labels, a.batch_size, "cpu", shuffle=True)
    start, train_acc = 0, float("nan")
    if os.path.exists(ckpt):
        st = torch.load(ckpt, weights_only=True)
        model.load_state_dict(st["model"]), opt.load_state_dict(st["opt"]), sched.load_state_dict(st["sched"])
        loss.load_state_dict(st["loss"]), gen.set_state(st["gen"]), torch.set_rng_state(st["rng"])
        start, train_acc = st["epoch"] + 1, st["train_acc"]
    for epoch in range(start, a.epochs):
        loss.start_epoch(epoch)
        t0 = time.perf_counter()
        train_acc = train_epoch(model, loss, opt, loader, gen)
        sched.step()
        if a.log_every and (epoch + 1) % a.log_every == 0:
            print(f"  epoch {epoch + 1}/{a.epochs} train acc {100 * train_acc:.1f}% "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        if a.checkpoint:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "loss": loss.state_dict(), "gen": gen.get_state(), "rng": torch.get_rng_state(),
                        "epoch": epoch, "train_acc": train_acc}, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
    return model, loss, train_acc


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def logits_of(model, x, batch=1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def scores(z, y, t=1.0) -> dict:
    r = M.summary(torch.softmax(z / t, -1), y)
    return {"T": t, "accuracy": 100 * r["accuracy"], "ece_pct": 100 * r["ece"], "nll": r["nll"]}


def temperatures(a, model, loss, data) -> dict:
    """T fitted on clean held-out labels, and without them (noisy held-out labels; for
    DPS also the bank: tools/posthoc_temperature.no_clean_data_fits)."""
    args = experiment_args(a)
    x_val, y_val = heldout_images(args, data, a.n_val)
    z_val = logits_of(model, x_val)
    bank = a.method == "dps"
    fits = no_clean_data_fits(z_val, noisy_heldout_labels(args, y_val, data.num_classes),
                              logits_of(model, data.x_train) if bank else None,
                              loss.posterior_means() if bank else None, data.labels)
    return {"clean_val": fit_temperature(z_val, y_val), **fits}


def bank_stats(loss, data) -> dict:
    """How well the bank's argmax recovers the clean labels, and how flat its means are."""
    if not hasattr(loss, "alpha"):
        return {}
    t = loss.posterior_means()
    h = -(t * t.clamp_min(1e-30).log()).sum(1).mean()
    return {"bank_argmax_clean_acc": 100 * float((t.argmax(1) == data.clean_labels).double().mean()),
            "bank_mean_max": float(t.max(1).values.mean()), "bank_mean_entropy": float(h)}


def evaluate(a, model, loss, data, train_acc) -> dict:
    z = logits_of(model, data.x_test)
    rec = {"before": scores(z, data.y_test), "train_acc_noisy": 100 * train_acc, **bank_stats(loss, data)}
    rec["ood_auroc"] = M.ood_auroc(torch.softmax(z, -1), torch.softmax(logits_of(model, data.x_ood), -1))
    rec["after"] = {k: scores(z, data.y_test, t) for k, t in temperatures(a, model, loss, data).items()}
    return rec


# --------------------------------------------------------------------------- records and table
def run_name(a) -> str:
    if a.name:
        return a.name
    if a.method == "ce":
        return "ce"
    parts = ["dps" if a.loss == "tool" else "dps-lib"]
    defaults = {"c": 100.0, "gamma": 0.95, "tau_e": 1.0, "tau_t": 1.0, "w0": 1.0, "w1": 1.0}
    parts += [f"{k}{getattr(a, k):g}" for k, d in defaults.items() if getattr(a, k) != d]
    if a.adapt:
        parts.append(f"adapt{a.adapt:g}" + ("" if a.adapt_from == "eta" else f"-{a.adapt_from}"))
    if a.plc:
        parts.append(f"plc{a.plc_tau:g}r{a.plc_ramp:g}")
    return "_".join(parts)


def one_run(a) -> dict:
    torch.set_num_threads(a.threads)
    name = run_name(a)
    folder = os.path.join(a.out, f"{a.model}{a.width or ''}", a.setting, name)
    path = os.path.join(folder, f"seed{a.seed}.json")
    if os.path.exists(path):
        print(f"{path} exists, skipped")
        with open(path) as f:
            return json.load(f)
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    data = ExperimentData(experiment_args(a))
    model, loss, train_acc = train(a, data, os.path.join(folder, f"seed{a.seed}.ckpt"))
    rec = {"name": name, "setting": a.setting, "seed": a.seed, "model": a.model, "config": vars(a),
           "noise": data.noise_info, **evaluate(a, model, loss, data, train_acc), "bank_history": loss.history,
           "wall_s": time.perf_counter() - t0}
    torch.save({"model": model.state_dict(), "loss": loss.state_dict()}, os.path.join(folder, f"seed{a.seed}.pt"))
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)
    if os.path.exists(os.path.join(folder, f"seed{a.seed}.ckpt")):
        os.remove(os.path.join(folder, f"seed{a.seed}.ckpt"))
    b, c = rec["before"], rec["after"]["clean_val"]
    print(f"{a.setting} {name} seed {a.seed}: acc {b['accuracy']:.2f} ECE {b['ece_pct']:.2f} NLL {b['nll']:.4f} | "
          f"clean-val T {c['T']:.3f} ECE {c['ece_pct']:.2f} | train acc {rec['train_acc_noisy']:.1f} "
          f"({rec['wall_s']:.0f} s)", flush=True)
    return rec


def reevaluate(root: str) -> None:
    """Recomputes the evaluation of every finished run under ``root`` from its saved
    model and bank (seed*.pt), e.g. after a new temperature fit was added."""
    for path in sorted(glob.glob(os.path.join(root, "**", "seed*.json"), recursive=True)):
        with open(path) as f:
            rec = json.load(f)
        saved = path[:-len(".json")] + ".pt"
        if not os.path.exists(saved):
            print(f"{path}: no saved model, kept as it is")
            continue
        a = argparse.Namespace(**{**vars(parse_args([])), **rec["config"]})
        data = ExperimentData(experiment_args(a))
        model, loss = build(a, data)[:2]
        st = torch.load(saved, weights_only=True)
        model.load_state_dict(st["model"]), loss.load_state_dict(st["loss"])
        rec.update(evaluate(a, model, loss, data, rec["train_acc_noisy"] / 100))
        with open(path, "w") as f:
            json.dump(rec, f, indent=1)
        print(f"{path}: re-evaluated", flush=True)


def mean_std(xs, d=2) -> str:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return f"{m:.{d}f}" if s is None else f"{m:.{d}f} ± {s:.{d}f}"


COLUMNS = [("acc %", lambda r: r["before"]["accuracy"], 2), ("ECE %", lambda r: r["before"]["ece_pct"], 2),
           ("NLL", lambda r: r["before"]["nll"], 3),
           ("T clean-val", lambda r: r["after"]["clean_val"]["T"], 2),
           ("ECE % at T clean-val", lambda r: r["after"]["clean_val"]["ece_pct"], 2),
           ("NLL at T clean-val", lambda r: r["after"]["clean_val"]["nll"], 3),
           ("T noisy-val", lambda r: r["after"]["noisy_val"]["T"], 2),
           ("ECE % at T noisy-val", lambda r: r["after"]["noisy_val"]["ece_pct"], 2),
           ("T posterior", lambda r: r["after"].get("posterior", {}).get("T"), 2),
           ("ECE % at T posterior", lambda r: r["after"].get("posterior", {}).get("ece_pct"), 2),
           ("T noisy-val via bank", lambda r: r["after"].get("noisy_val_bank", {}).get("T"), 2),
           ("ECE % at T noisy-val via bank", lambda r: r["after"].get("noisy_val_bank", {}).get("ece_pct"), 2),
           ("T train via bank", lambda r: r["after"].get("train_bank", {}).get("T"), 2),
           ("ECE % at T train via bank", lambda r: r["after"].get("train_bank", {}).get("ece_pct"), 2),
           ("train acc % (noisy)", lambda r: r["train_acc_noisy"], 1)]


def table(root: str, names=None) -> str:
    """Markdown, one row per (model, setting, run): mean ± std over the seeds found."""
    groups = {}
    for p in sorted(glob.glob(os.path.join(root, "**", "seed*.json"), recursive=True)):
        with open(p) as f:
            r = json.load(f)
        if names is None or r["name"] in names:
            groups.setdefault((r["model"], r["setting"], r["name"]), []).append(r)
    order = {s: i for i, s in enumerate(SETTINGS)}
    head = "| model | setting | run | seeds | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for (model, setting, name), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]], kv[0][2])):
        cells = []
        for _, get, d in COLUMNS:
            xs = [get(r) for r in rs if get(r) is not None]
            cells.append(mean_std(xs, d) if xs else "")
        lines.append(f"| {model} | {setting} | {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--table", metavar="ROOT", help="print the markdown table of the records under ROOT and exit")
    a("--names", default="", help="with --table: only these comma-separated run names")
    a("--reevaluate", metavar="ROOT", help="recompute the evaluation of the saved runs under ROOT and exit")
    a("--out", default="runs/calib")
    a("--name", default="", help="run name (default: built from the options)")
    a("--setting", default="sym40", choices=list(SETTINGS))
    a("--seed", type=int, default=0)
    a("--method", default="dps", choices=["ce", "dps"])
    a("--loss", default="tool", choices=["tool", "library"], help="DPS in plain PyTorch, or dps_fast.DPSLoss")
    a("--model", default="mlp", choices=["mlp", "resnet"])
    a("--width", type=int, default=0)
    a("--blocks", type=int, default=1)
    a("--train-subset", type=int, default=5000)
    a("--epochs", type=int, default=50)
    a("--batch-size", type=int, default=128)
    a("--lr", type=float, default=0.05)
    a("--weight-decay", type=float, default=5e-4)
    a("--c", type=float, default=100.0)
    a("--eps", type=float, default=1e-2)
    a("--gamma", type=float, default=0.95)
    a("--tau-e", type=float, default=1.0, help="evidence temperature")
    a("--tau-t", type=float, default=1.0, help="target temperature: t^(1/tau_t), renormalised")
    a("--w0", type=float, default=1.0, help="evidence weight at the first epoch")
    a("--w1", type=float, default=1.0, help="evidence weight at the last epoch (linear in between)")
    a("--adapt", type=float, default=0.0, help="noise-adaptive evidence temperature: tau_e = 1 - k * eta(bank)")
    a("--adapt-from", default="eta", choices=["eta", "score"], help="the bank statistic --adapt uses")
    a("--plc", action="store_true", help="ProSelfLC-style entropy-adaptive sharpening of the target")
    a("--plc-tau", type=float, default=0.5, help="temperature of the trusted, sharpened target (0: one-hot)")
    a("--plc-ramp", type=float, default=1.0, help="global trust g reaches 1 after this fraction of the epochs")
    a("--n-val", type=int, default=5000)
    a("--threads", type=int, default=1)
    a("--checkpoint", action="store_true", help="save a resumable checkpoint every epoch (ResNet runs)")
    a("--log-every", type=int, default=0)
    args = p.parse_args(argv)
    for k in ("tau_e", "tau_t", "gamma", "c", "eps"):
        if getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive")
    if args.plc_tau < 0:
        p.error("--plc-tau must be >= 0")
    return args


def main(argv=None):
    a = parse_args(argv)
    if a.table:
        print(table(a.table, set(a.names.split(",")) if a.names else None))
        return
    if a.reevaluate:
        torch.set_num_threads(a.threads)
        reevaluate(a.reevaluate)
        return
    one_run(a)


if __name__ == "__main__":
    main()

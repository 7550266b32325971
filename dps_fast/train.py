"""dps-train: train image classifiers with DPS and baselines on offline data.

    dps-train --dataset digits --compare ce,dps             # the `make demo` job
    dps-train --dataset fashion-mnist --model resnet --method dps --epochs 60 \
              --train-subset 10000 --noise sym --noise-rate 0.4 --out runs/fm
    python -m dps_fast.train --help

Each run writes to ``--out/<method>/``: config.json, metrics.csv (one row per
epoch), final.json, reliability.png, curves.png, noisy_labels.pt (when noisy) and
checkpoint.pt (every epoch, atomically; ``--resume`` continues from it and, on
CPU, reproduces the uninterrupted run bit for bit).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from . import metrics as M
from .data import Loader, augment, load_dataset, resize_to, stratified_subset
from .methods import METHODS, build_method
from .models import ProjectionHead, build_model
from .noise import KINDS, inject_noise

DEMO = dict(dataset="digits", model="mlp", compare="ce,dps", epochs=40, batch_size=64, lr=0.05,
            weight_decay=0.0, width=256, augment=False, c=100.0, gamma=0.95)


def parse_args(argv=None):
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
    args = p.parse_args(argv)
    if args.demo:
        explicit = {k.lstrip("-").split("=")[0].replace("-", "_") for k in (argv or sys.argv[1:]) if k.startswith("--")}
        for k, v in DEMO.items():
            if k not in explicit:
                setattr(args, k, v)
    return args


# --------------------------------------------------------------------------- helpers
def atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_dump(obj, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


class Prepared:
    """The data of one experiment: split, subset, noise, standardisation, OOD set."""

    def __init__(self, args):
        ds = load_dataset(args.dataset, args.data_root, seed=0)
        x_tr, y_tr = ds.x_train, ds.y_train
        if args.train_subset and args.train_subset < len(y_tr):
            keep = stratified_subset(y_tr, args.train_subset, seed=0)
            x_tr, y_tr = x_tr[keep], y_tr[keep]
        self.clean_labels = y_tr
        self.noise_info = {"kind": "none", "rate": 0.0, "realised": 0.0}
        self.labels = y_tr
        if args.noise != "none" and args.noise_rate > 0:
            self.labels, self.noise_info = inject_noise(y_tr, ds.num_classes, args.noise, args.noise_rate,
                                                        args.noise_seed, dataset=args.dataset)
        mean, std = float(x_tr.mean()), float(x_tr.std())
        self.norm = lambda x: (x - mean) / std
        self.x_train, self.x_test, self.y_test = self.norm(x_tr), self.norm(ds.x_test), ds.y_test
        self.num_classes, self.flip, self.name = ds.num_classes, ds.flip, ds.name
        self.image_shape = tuple(x_tr.shape[1:])
        self.ood_name, self.x_ood = None, None
        ood = args.ood
        if ood == "auto":
            ood = "mnist-5k" if args.dataset == "fashion-mnist" else "none"
        if ood != "none":
            o = load_dataset(ood, None)
            self.ood_name = o.name
            self.x_ood = self.norm(resize_to(o.x_test, self.image_shape[-1]))


def model_from_args(args, data):
    """The model a run's arguments (or its saved config) describe, freshly initialised."""
    kw = {"width": args.width} if args.width and args.model != "mlp" else \
        ({"hidden": args.width} if args.width else {})
    if args.model == "resnet":
        kw["blocks"] = args.blocks
    return build_model(args.model, data.image_shape, data.num_classes, **kw)


@torch.no_grad()
def predict(model, x, device, batch):
    model.eval()
    out = [torch.softmax(model(x[i:i + batch].to(device)).float(), -1).cpu() for i in range(0, len(x), batch)]
    return torch.cat(out)


def evaluate(model, data: Prepared, device, batch) -> tuple[dict, torch.Tensor]:
    probs = predict(model, data.x_test, device, batch)
    res = M.summary(probs, data.y_test)
    if data.x_ood is not None:
        res["ood_auroc"] = M.ood_auroc(probs, predict(model, data.x_ood, device, batch))
    return res, probs


def _median_time(fn, reps=15, warmup=3):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def loss_overhead(method, model, proj, loader, gen, device) -> dict:
    """Median time of the loss part (forward + backward through the loss only) of
    this method against plain cross-entropy, and of one whole CE training step."""
    x, y, idx = next(loader.epoch(torch.Generator().manual_seed(0)))
    m = copy.deepcopy(method)
    with torch.no_grad():
        model.eval()
        xv = torch.cat([x] * m.views)
        h = model.embed(xv)
        logits = model.head(h).view(m.views, len(y), -1) if m.views > 1 else model.head(h)
        feats = proj(h).view(m.views, len(y), -1) if (proj is not None and m.needs_features) else None
        model.train()
    z = logits.detach().requires_grad_(True)
    f = feats.detach().requires_grad_(True) if feats is not None else None

    def method_step():
        z.grad = None
        m.loss(z, idx, y, f).backward()

    z1 = (logits[0] if m.views > 1 else logits).detach().requires_grad_(True)

    def ce_step():
        z1.grad = None
        F.cross_entropy(z1, y).backward()

    mdl = copy.deepcopy(model)
    opt = torch.optim.SGD(mdl.parameters(), lr=1e-3)

    def whole_ce_step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(mdl(x), y).backward()
        opt.step()

    t_m, t_ce, t_step = _median_time(method_step), _median_time(ce_step), _median_time(whole_ce_step)
    return {"loss_ms": 1e3 * t_m, "ce_loss_ms": 1e3 * t_ce, "ce_step_ms": 1e3 * t_step,
            "overhead_pct_of_ce_step": 100 * (t_m - t_ce) / t_step, "batch": len(y)}


# --------------------------------------------------------------------------- plots
def save_plots(out_dir: str, history: list, probs: torch.Tensor, labels: torch.Tensor, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf, pred = probs.max(1)
    hit = (pred == labels).double()
    n_bins = 15
    edges = torch.linspace(0, 1, n_bins + 1)
    idx = torch.bucketize(conf.double(), edges[1:-1].double(), right=False)
    accs, confs, counts = [], [], []
    for b in range(n_bins):
        sel = idx == b
        counts.append(int(sel.sum()))
        accs.append(float(hit[sel].mean()) if sel.any() else 0.0)
        confs.append(float(conf[sel].double().mean()) if sel.any() else 0.0)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    centers = ((edges[:-1] + edges[1:]) / 2).numpy()
    ax.bar(centers, accs, width=1 / n_bins, edgecolor="k", alpha=0.8, label="accuracy")
    ax.bar(centers, [c - a if n else 0 for a, c, n in zip(accs, confs, counts)], bottom=accs,
           width=1 / n_bins, color="tab:red", alpha=0.3, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ece = 100 * M.ece(probs, labels, n_bins)
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"{title}\nECE {ece:.2f}% (15 bins)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "reliability.png"), dpi=100)
    plt.close(fig)

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
    axs[2].set(title="test ECE % (15 bins)", xlabel="epoch")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- one run
class TrainNet(torch.nn.Module):
    """The trained network: model (+ projection head); one forward for DDP."""

    def __init__(self, model, proj):
        super().__init__()
        self.model, self.proj = model, proj

    def forward(self, x):
        h = self.model.embed(x)
        logits = self.model.head(h)
        feats = F.normalize(self.proj(h), dim=1) if self.proj is not None else None
        return logits, feats


def _dist_epoch(gen: torch.Generator, n: int, world: int, rank: int, batch: int, device):
    """DistributedSampler-style epoch: one permutation (the same on every rank),
    padded by repetition to a multiple of world; rank r takes positions r, r+W, ...
    Yields (index, valid) local batches; valid is False for the padding repeats."""
    from .distributed import padding_mask

    order = torch.randperm(n, generator=gen)
    padded = torch.cat([order, order[: (-n) % world]])
    local = padded[rank::world]
    valid = padding_mask(n, world, rank, torch.arange(len(local)))
    for k in range(0, len(local), batch):
        yield local[k:k + batch].to(device), valid[k:k + batch].to(device)


def _config(args, method: str) -> dict:
    cfg = {k: v for k, v in vars(args).items() if k not in ("compare", "demo", "resume")}
    cfg["method"] = method
    return cfg


def run(args, method_name: str, data: Prepared, log=print, rank: int = 0, world: int = 1) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    out_dir = os.path.join(args.out, method_name)
    os.makedirs(out_dir, exist_ok=True)
    cfg = _config(args, method_name)
    cfg["world"] = world
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    lead = rank == 0

    torch.manual_seed(args.seed)
    model = model_from_args(args, data).to(device)
    method = build_method(method_name, data.labels, data.num_classes, args.epochs, cfg, device)
    proj = ProjectionHead(model.feature_dim, args.proj_dim).to(device) if method.needs_features else None
    net = TrainNet(model, proj)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    params = list(model.parameters()) + (list(proj.parameters()) if proj is not None else [])
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                              nesterov=args.momentum > 0)
    else:
        opt = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, args.epochs))
    gen = torch.Generator().manual_seed(args.seed + 1)  # data order and augmentation
    loader = Loader(data.x_train, data.labels, args.batch_size, device, shuffle=True)
    local_batch = max(1, args.batch_size // world)
    pad = 1 if data.image_shape[-1] <= 8 else 2
    bank_dir = os.path.join(out_dir, "bank")
    history, start = [], 0

    if args.resume and os.path.exists(ckpt_path):
        st = torch.load(ckpt_path, map_location=device, weights_only=True)
        if st["config"]["method"] != method_name or st["config"]["dataset"] != args.dataset:
            raise ValueError(f"{ckpt_path} belongs to another run ({st['config']['method']} on "
                             f"{st['config']['dataset']})")
        model.load_state_dict(st["model"])
        if proj is not None:
            proj.load_state_dict(st["proj"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if world > 1 and method.distributed_bank:
            from .distributed import load_bank

            load_bank(method.dps, bank_dir)  # saved with any world size
        else:
            method.load_state_dict(st["method"])
        gen.set_state(st["data_rng"])
        torch.set_rng_state(st["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in st:
            torch.cuda.set_rng_state(st["cuda_rng"].cpu())
        history, start = st["history"], st["epoch"] + 1
        log(f"[{method_name}] resumed from {ckpt_path} at epoch {start}/{args.epochs}")
    elif lead:
        _json_dump({**cfg, "noise_info": data.noise_info, "n_train": len(data.labels)},
                   os.path.join(out_dir, "config.json"))
    if data.noise_info["kind"] != "none" and lead:
        torch.save({"noisy": data.labels, "clean": data.clean_labels, "info": data.noise_info},
                   os.path.join(out_dir, "noisy_labels.pt"))

    progress = (args.progress if args.progress is not None else sys.stderr.isatty()) and lead
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        progress = False

    data_x, data_y = loader.x, loader.y
    for epoch in range(start, args.epochs):
        net.train()
        method.start_epoch(epoch)
        t0 = time.perf_counter()
        tot = torch.zeros(3, dtype=torch.float64)  # loss sum, hits, samples
        if world > 1:
            batches = ((data_x[i], data_y[i], i, v) for i, v in
                       _dist_epoch(gen, len(data.labels), world, rank, local_batch, device))
            nb = -(-(-(-len(data.labels) // world)) // local_batch)
        else:
            batches = ((x, y, i, None) for x, y, i in loader.epoch(gen))
            nb = len(loader)
        bar = tqdm(batches, total=nb, desc=f"{method_name} {epoch + 1}/{args.epochs}", leave=False,
                   disable=not progress, unit="batch") if progress else batches
        for x, y, idx, valid in bar:
            b = len(y)
            views = [augment(x, pad, data.flip, gen) if args.augment else x for _ in range(method.views)]
            logits, feats = net(torch.cat(views))
            if method.views > 1:
                logits = logits.view(method.views, b, -1)
                if feats is not None:
                    feats = feats.view(method.views, b, -1)
            loss = method.loss(logits, idx, y, feats, valid=valid)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"[{method_name}] non-finite loss at epoch {epoch + 1}")
            first = logits[0] if method.views > 1 else logits
            tot += torch.tensor([lv * b, float((first.argmax(-1) == y).sum()), b], dtype=torch.float64)
            if progress:
                bar.set_postfix(loss=f"{tot[0] / tot[2]:.4f}", img_s=f"{tot[2] / (time.perf_counter() - t0):.0f}")
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(tot)
        tot_loss, tot_hit, tot_n = float(tot[0]), int(tot[1]), int(tot[2])
        method.end_epoch()
        sched.step()
        train_time = time.perf_counter() - t0
        if world > 1 and method.distributed_bank:
            from .distributed import save_bank

            save_bank(method.dps, bank_dir)
        if not lead:
            continue
        if (epoch + 1) % max(1, args.eval_every) and epoch + 1 != args.epochs:
            res = {}
        else:
            res, probs = evaluate(model, data, device, args.eval_batch)
        row = {"epoch": epoch + 1, "train_loss": tot_loss / tot_n, "train_acc": tot_hit / tot_n,
               "lr": opt.param_groups[0]["lr"], "epoch_s": train_time, "img_per_s": tot_n / train_time, **res}
        history.append(row)
        msg = (f"[{method_name}] epoch {epoch + 1:3d}/{args.epochs} loss {row['train_loss']:.4f} "
               f"train {100 * row['train_acc']:.1f}%")
        if res:
            msg += (f" | test acc {100 * res['accuracy']:.2f}% ECE {res['ece_pct']:.2f}% (15 bins) "
                    f"NLL {res['nll']:.4f}")
        if "ood_auroc" in res:
            msg += f" OOD-AUROC {res['ood_auroc']:.4f}"
        log(msg + f" ({row['img_per_s']:.0f} img/s)")
        with open(os.path.join(out_dir, "metrics.csv"), "w", newline="") as f:
            fields = list(dict.fromkeys(k for h in history for k in h))
            w = csv.DictWriter(f, fieldnames=fields, restval="")
            w.writeheader()
            w.writerows(history)
        state = {"epoch": epoch, "config": cfg, "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(),
                 "method": {} if (world > 1 and method.distributed_bank) else method.state_dict(),
                 "data_rng": gen.get_state(),
                 "torch_rng": torch.get_rng_state(), "history": history, "noisy_labels": data.labels,
                 "noise_info": data.noise_info}
        if proj is not None:
            state["proj"] = proj.state_dict()
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state()
        atomic_save(state, ckpt_path)

    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if not lead:
            return {}
    res, probs = evaluate(model, data, device, args.eval_batch)
    timing = loss_overhead(method, model, proj, loader, gen, device) if world == 1 else \
        {"loss_ms": float("nan"), "ce_loss_ms": float("nan"), "ce_step_ms": float("nan"),
         "overhead_pct_of_ce_step": float("nan"), "batch": local_batch}
    log(f"[{method_name}] loss part {timing['loss_ms']:.3f} ms vs plain CE {timing['ce_loss_ms']:.3f} ms "
        f"per step of {timing['batch']}; a whole CE step {timing['ce_step_ms']:.2f} ms -> overhead "
        f"{timing['overhead_pct_of_ce_step']:+.1f}% of a CE step")
    final = {"method": method_name, "final": res, "history": history, "timing": timing,
             "noise": data.noise_info, "n_train": len(data.labels), "dataset": data.name,
             "ood": data.ood_name, "config": cfg,
             "model_sha": _state_digest(model)}
    _json_dump(final, os.path.join(out_dir, "final.json"))
    if args.plots and history:
        save_plots(out_dir, history, probs, data.y_test, f"{method_name} on {data.name}")
    return final


def _state_digest(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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
        data = Prepared(args)
        for m in methods:
            run(args, m, data, log=print if rank == 0 else (lambda *a, **k: None), rank=rank, world=world)
        dist.barrier()  # quiesce before teardown (gloo aborts a process torn down mid-traffic)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
    t0 = time.perf_counter()
    data = Prepared(args)
    print(f"dps-train: {data.name}, {len(data.labels)} train / {len(data.y_test)} test images "
          f"{data.image_shape}, {data.num_classes} classes; noise {data.noise_info}; OOD {data.ood_name}"
          + (f"; {args.nproc} processes, bank {args.bank}" if args.nproc > 1 else ""))
    print("config: " + json.dumps({k: v for k, v in sorted(vars(args).items())}))
    os.makedirs(args.out, exist_ok=True)
    if args.nproc > 1:
        import tempfile

        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_ddp_worker, args=(args.nproc, args, methods, os.path.join(tmp, "store")),
                     nprocs=args.nproc, join=True)
        results = []
        for m in methods:
            with open(os.path.join(args.out, m, "final.json")) as f:
                results.append(json.load(f))
    else:
        results = [run(args, m, data) for m in methods]
    table = format_table(results)
    wall = time.perf_counter() - t0
    print(f"\n{data.name}, model {args.model}, {args.epochs} epochs, seed {args.seed}, "
          f"noise {data.noise_info['kind']} {data.noise_info.get('realised', 0):.3f} realised; "
          f"final-epoch test metrics:\n{table}\n(wall time {wall:.1f} s)")
    if len(results) > 1:
        _json_dump({"results": [{k: r[k] for k in ("method", "final", "timing")} for r in results],
                    "table": table, "config": vars(args)}, os.path.join(args.out, "compare.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

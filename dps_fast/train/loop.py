"""One training run, in steps: build, restore, train an epoch, record it, finish.

Each run writes to ``<out>/<method>/``: config.json, metrics.csv (one row per
epoch), final.json, reliability.png, curves.png, noisy_labels.pt (when noisy) and
checkpoint.pt (every epoch, atomically; ``--resume`` continues from it and, on
CPU, reproduces the uninterrupted run bit for bit). A first Ctrl-C stops a
one-process run after the current batch and saves a mid-epoch checkpoint (the
epoch's sample order, batches done, partial sums and RNG states), from which
``--resume`` continues bit for bit too; a second Ctrl-C quits at once, keeping the
last checkpoint. Distributed banks are saved per rank under ``bank/epoch-K/``,
all ranks before checkpoint.pt names the folder, so a kill never pairs a
checkpoint with another epoch's bank.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import Loader, augment
from .images import StreamLoader, draw_seed
from .errors import Interrupted, RunError, UsageError
from .experiment import ExperimentData, evaluate, model_from_args
from .files import atomic_save, json_dump, state_digest
from .rundir import DATA_KEY, NOT_SAVED, RUNTIME_KEYS, saved_progress
from .label_report import write_label_issues
from .methods import build_method
from .models import ProjectionHead
from .plots import save_plots
from .speed import Speed, compiled, prepare_model
from .timing import StepClock, format_duration, loss_overhead, no_timing


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


@dataclass
class Run:
    """Everything one run of one method holds."""
    args: object
    method_name: str
    data: ExperimentData
    rank: int
    world: int
    device: torch.device
    out_dir: str
    cfg: dict
    model: torch.nn.Module
    proj: torch.nn.Module | None
    net: torch.nn.Module
    method: object
    opt: torch.optim.Optimizer
    sched: object
    gen: torch.Generator
    loader: Loader
    history: list = field(default_factory=list)
    start: int = 0
    segments: list = field(default_factory=list)  # the parts of the run: where and how each computed
    partial: dict | None = None  # a stopped epoch's progress (mid-epoch checkpoint)
    bank_subdir: str | None = None  # the per-rank bank folder of the last checkpoint
    speed: Speed | None = None
    clock: StepClock | None = None

    @property
    def streamed(self) -> bool:
        return self.data.streamed

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def crop_pad(self) -> int:
        return 1 if self.data.image_shape[-1] <= 8 else 2

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.out_dir, "checkpoint.pt")

    @property
    def shared_bank(self) -> bool:
        """The bank is spread over the ranks and saved per rank, not in checkpoint.pt."""
        return self.world > 1 and self.method.distributed_bank


def run_config(args, method: str, world: int, data_digest: str | None = None) -> dict:
    """The saved config of one method's run (data_sha: the data's fingerprint, once loaded)."""
    cfg = {k: v for k, v in vars(args).items() if k not in NOT_SAVED}
    cfg["method"], cfg["world"] = method, world
    if data_digest is not None:
        cfg[DATA_KEY] = data_digest
    return cfg


def segment(r: "Run") -> dict:
    """One part of a run: from which epoch (and batch), and where and how it computed."""
    seg = {"start_epoch": r.start, **{k: r.cfg.get(k) for k in ("device", "backend", "world", "bank", "threads")}}
    if r.partial:
        seg["start_batch"] = r.partial["done"]
    return seg


def make_optimizer(args, params):
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                               nesterov=args.momentum > 0)
    return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)


def run_device(args, rank: int, world: int) -> torch.device:
    device = torch.device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def build_run(args, method_name: str, data: ExperimentData, rank: int = 0, world: int = 1) -> Run:
    device = run_device(args, rank, world)
    out_dir = os.path.join(args.out, method_name)
    os.makedirs(out_dir, exist_ok=True)
    cfg = run_config(args, method_name, world, data.digest)
    torch.manual_seed(args.seed)
    model = prepare_model(model_from_args(args, data).to(device), args)
    method = build_method(method_name, data.labels, data.num_classes, args.epochs, cfg, device)
    proj = ProjectionHead(model.feature_dim, args.proj_dim).to(device) if method.needs_features else None
    net = TrainNet(model, proj)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    params = list(model.parameters()) + (list(proj.parameters()) if proj is not None else [])
    opt = make_optimizer(args, params)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, args.epochs))
    gen = torch.Generator().manual_seed(args.seed + 1)  # data order and augmentation
    if data.streamed:
        data.train_set.views = method.views
        loader = StreamLoader(data.train_set, args.batch_size, device, args.workers)
    else:
        loader = Loader(data.x_train, data.labels, args.batch_size, device, shuffle=True)
    return Run(args, method_name, data, rank, world, device, out_dir, cfg, model, proj, compiled(net, args),
               method, opt, sched, gen, loader, speed=Speed(args, device), clock=StepClock(device))


def load_weights(r: Run, st: dict) -> None:
    try:
        r.model.load_state_dict(st["model"])
        if r.proj is not None:
            r.proj.load_state_dict(st["proj"])
        r.opt.load_state_dict(st["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:  # the config check should have caught this
        raise UsageError(f"{r.ckpt_path} does not fit this run's model or optimiser "
                         f"({str(e).splitlines()[0]}); start a new run with --overwrite") from e
    r.sched.load_state_dict(st["scheduler"])


def load_bank_state(r: Run, st: dict) -> None:
    """The method's bank from the checkpoint (or, for a shared bank, its shard files). A bank
    that fails the load's checks (non-finite or non-positive values, wrong shape, labels out of
    range, a damaged shard) is a one-line error naming the file; nothing on disk changes."""
    r.bank_subdir = st.get("bank_dir", "bank")
    where = os.path.join(r.out_dir, r.bank_subdir) if r.shared_bank else r.ckpt_path
    try:
        if r.shared_bank:
            r.method.load_bank(where)  # saved with any world size
        else:
            r.method.load_state_dict(st["method"])
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise UsageError(f"{where}: the saved bank does not load ({lines[-1] if lines else type(e).__name__}); "
                         f"start a new run with --overwrite") from e


def restore(r: Run, log) -> None:
    """Continues ``r`` from its checkpoint: weights, optimiser, schedule, bank, RNG states,
    and a stopped epoch's progress. The saved config is kept (plan_runs checked that every
    result-changing setting matches); only the runtime settings are this invocation's."""
    st = torch.load(r.ckpt_path, map_location=r.device, weights_only=True)
    load_bank_state(r, st)  # first: the bank verifies everything before it writes (docs/method.md §8.1)
    load_weights(r, st)
    r.method.load_scalar_state(st.get("method_scalars", {}))
    r.speed.load_state_dict(st.get("grad_scaler", {}))
    r.gen.set_state(st["data_rng"])
    torch.set_rng_state(st["torch_rng"])
    if r.device.type == "cuda" and "cuda_rng" in st:
        torch.cuda.set_rng_state(st["cuda_rng"].cpu())
    r.cfg = {**st["config"], **{k: r.cfg[k] for k in RUNTIME_KEYS if k in r.cfg}}
    r.history, r.start, r.partial = st["history"], st["epoch"] + 1, st.get("partial")
    r.segments = st.get("segments", []) + [segment(r)]
    log(f"[{r.method_name}] resumed from {r.ckpt_path} after {saved_progress(st)}")


def write_run_start(r: Run) -> None:
    r.segments = [segment(r)]
    if not r.lead:
        return
    json_dump({**r.cfg, "noise_info": r.data.noise_info, "n_train": len(r.data.labels)},
              os.path.join(r.out_dir, "config.json"))
    write_data_split(r)


def write_data_split(r: Run) -> None:
    """data_split.json: the user's row (npz) or index (streamed set) of each training sample,
    and the held-out rows, when the trainer chose them (npz without x_test, --train-subset)."""
    d = r.data
    if d.row_ids is None and d.test_row_ids is None:
        return
    split = {"dataset": r.args.dataset, "note": "training sample k (the bank's row k, label_issues.csv's "
             "'sample', noisy_labels.pt's entry k, soft_labels' row k) is row train_rows[k] of the data"}
    split["train_rows"] = (d.row_ids if d.row_ids is not None else torch.arange(len(d.labels))).tolist()
    if d.test_row_ids is not None:
        split["test_rows"] = d.test_row_ids.tolist()
    json_dump(split, os.path.join(r.out_dir, "data_split.json"))


def write_noisy_labels(r: Run) -> None:
    if r.data.noise_info["kind"] != "none" and r.lead:
        rows = {"rows": r.data.row_ids} if r.data.row_ids is not None else {}
        torch.save({"noisy": r.data.labels, "clean": r.data.clean_labels, "info": r.data.noise_info, **rows},
                   os.path.join(r.out_dir, "noisy_labels.pt"))


def distributed_epoch(gen: torch.Generator, n: int, world: int, rank: int, batch: int, device):
    """DistributedSampler-style epoch: one permutation (the same on every rank),
    padded by repetition to a multiple of world; rank r takes positions r, r+W, ...
    Yields (index, valid) local batches; valid is False for the padding repeats."""
    from ..banks import padding_mask

    order = torch.randperm(n, generator=gen)
    padded = torch.cat([order, order[: (-n) % world]])
    local = padded[rank::world]
    valid = padding_mask(n, world, rank, torch.arange(len(local)))
    for k in range(0, len(local), batch):
        yield local[k:k + batch].to(device), valid[k:k + batch].to(device)


def stream_batches(r: Run, resume: dict | None):
    """epoch_batches of a streamed data set: the order and the augmentation seed come from
    the run's generator (or the stopped epoch's record), the pixels from the workers."""
    if r.world > 1:
        local_batch = max(1, r.args.batch_size // r.world)
        parts = list(distributed_epoch(r.gen, len(r.data.labels), r.world, r.rank, local_batch, "cpu"))
        seed = draw_seed(r.gen) if r.args.augment else 0
        xs = r.loader.index_batches([i for i, _ in parts], seed)
        return ((x, y, i, v.to(r.device)) for (x, y, i), (_, v) in zip(xs, parts)), len(parts), None, seed
    order = resume["order"] if resume else r.loader.order(r.gen)
    seed = resume["aug_seed"] if resume else (draw_seed(r.gen) if r.args.augment else 0)
    start = resume["done"] if resume else 0
    batches = ((x, y, i, None) for x, y, i in r.loader.batches(order, start, seed))
    return batches, len(r.loader), order, seed


def epoch_batches(r: Run, resume: dict | None):
    """(x, y, index, valid) batches of one epoch from ``resume['done']`` on (a stopped
    epoch, one process only), how many the epoch has, its sample order and augmentation
    seed (streamed data only)."""
    if r.streamed:
        return stream_batches(r, resume)
    if r.world > 1:
        local_batch = max(1, r.args.batch_size // r.world)
        x, y, n = r.loader.x, r.loader.y, len(r.data.labels)
        batches = ((x[i], y[i], i, v) for i, v in distributed_epoch(r.gen, n, r.world, r.rank, local_batch,
                                                                     r.device))
        return batches, -(-(-(-n // r.world)) // local_batch), None, None
    order = resume["order"] if resume else r.loader.order(r.gen)
    start = resume["done"] if resume else 0
    batches = ((x, y, i, None) for x, y, i in r.loader.batches(order, start))
    return batches, len(r.loader), order, None


def progress_bar(r: Run, batches, total: int, epoch: int, done: int = 0):
    show = r.args.progress if r.args.progress is not None else sys.stderr.isatty()
    if not (show and r.lead):
        return batches, None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return batches, None
    bar = tqdm(batches, total=total, initial=done, desc=f"{r.method_name} {epoch + 1}/{r.args.epochs}",
               leave=False, unit="batch")
    return bar, bar


def step_views(r: Run, x) -> list:
    """The batch's views: augmented here (in-memory data) or by the workers (streamed data:
    [B, V, C, H, W] for V > 1 views)."""
    if r.streamed:
        return list(x.unbind(1)) if x.dim() == 5 else [x]
    return [augment(x, r.crop_pad, r.data.flip, r.gen) if r.args.augment else x for _ in range(r.method.views)]


def train_step(r: Run, x, y, idx, valid):
    """One optimiser step; returns (loss value, logits of the first view). The clock times
    the DPS loss's share of the step (its forward: bank gather, posterior update, target)."""
    clock = r.clock.start()
    with r.speed.autocast():
        logits, feats = r.net(r.speed.prepare(torch.cat(step_views(r, x))))
    logits, feats = logits.float(), (feats.float() if feats is not None else None)  # the loss works in float32
    if r.method.views > 1:
        logits = logits.view(r.method.views, len(y), -1)
        if feats is not None:
            feats = feats.view(r.method.views, len(y), -1)
    clock.mark()
    loss = r.method.loss(logits, idx, y, feats, valid=valid)
    clock.mark_loss()
    r.opt.zero_grad(set_to_none=True)
    r.speed.backward_step(loss, r.opt)
    clock.stop()
    return float(loss.detach()), (logits[0] if r.method.views > 1 else logits)


def train_epoch(r: Run, epoch: int, stop: "StopRequest | None" = None) -> dict | None:
    """Trains one epoch (or the rest of a stopped one); returns its loss, accuracy on the
    given labels, and time; or None when ``stop`` asked to stop mid-epoch (``r.partial``
    then holds the progress to checkpoint)."""
    r.net.train()
    r.method.start_epoch(epoch)
    resume, r.partial = (r.partial if r.partial and r.partial["epoch"] == epoch else None), None
    t0 = time.perf_counter() - (resume["elapsed"] if resume else 0.0)
    tot = resume["tot"].clone() if resume else torch.zeros(3, dtype=torch.float64)  # loss sum, hits, samples
    done = resume["done"] if resume else 0
    batches, total, order, seed = epoch_batches(r, resume)
    batches, bar = progress_bar(r, batches, total, epoch, done)
    r.clock.new_epoch()
    for x, y, idx, valid in batches:
        lv, first = train_step(r, x, y, idx, valid)
        if not math.isfinite(lv):
            raise RunError(f"[{r.method_name}] non-finite loss at epoch {epoch + 1}: the run diverged (try a lower "
                           f"--lr); {r.ckpt_path} keeps the last finished epoch")
        tot += torch.tensor([lv * len(y), float((first.argmax(-1) == y).sum()), len(y)], dtype=torch.float64)
        done += 1
        if bar is not None:
            bar.set_postfix(loss=f"{tot[0] / tot[2]:.4f}", img_s=f"{tot[2] / (time.perf_counter() - t0):.0f}")
        if r.lead:
            r.clock.maybe_eta(r, epoch, done, total)
        if stop is not None and stop.requested and done < total:
            r.partial = {"epoch": epoch, "done": done, "order": order, "tot": tot,
                         "elapsed": time.perf_counter() - t0, "aug_seed": seed}
            return None
    if r.world > 1:
        import torch.distributed as dist

        dist.all_reduce(tot)
    r.method.end_epoch()
    r.sched.step()
    dt = time.perf_counter() - t0
    return {"train_loss": float(tot[0]) / float(tot[2]), "train_acc": float(tot[1]) / float(tot[2]),
            "epoch_s": dt, "img_per_s": float(tot[2]) / dt, "loss_share_pct": r.clock.loss_share_pct()}


def percent_text(pct: float) -> str:
    """A share in percent with the digits it has: 12.3%, 0.41%, 0.0013% (a DPS loss on a
    ResNet step on the CPU is about a thousandth of a percent), <0.0001%."""
    if pct >= 1:
        return f"{pct:.1f}%"
    return f"{pct:.2g}%" if pct >= 1e-4 else "<0.0001%"


def record_epoch(r: Run, epoch: int, stats: dict, info: dict, log) -> None:
    """Evaluates (every --eval-every epochs and at the end), logs and appends the epoch's row
    (``info``: the method's numbers of the epoch, Method.epoch_info)."""
    args = r.args
    due = (epoch + 1) % max(1, args.eval_every) == 0 or epoch + 1 == args.epochs
    res = evaluate(r.model, r.data, r.device, args.eval_batch, args.workers, r.speed)[0] if due else {}
    row = {"epoch": epoch + 1, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
           "lr": r.opt.param_groups[0]["lr"], "epoch_s": stats["epoch_s"], "img_per_s": stats["img_per_s"],
           **info, **res}
    # a timing, like epoch_s, but kept out of the history (which resumed runs compare bit for bit)
    r.clock.shares[epoch + 1] = stats["loss_share_pct"]
    r.history.append(row)
    msg = (f"[{r.method_name}] epoch {epoch + 1:3d}/{args.epochs} loss {row['train_loss']:.4f} "
           f"train {100 * row['train_acc']:.1f}%")
    if res:
        msg += (f" | test acc {100 * res['accuracy']:.2f}% ECE {res['ece_pct']:.2f}% (15 bins) "
                f"NLL {res['nll']:.4f}")
    msg += "".join(f" {k} {v:.3f}" for k, v in info.items())
    if "ood_auroc" in res:
        msg += f" OOD-AUROC {res['ood_auroc']:.4f}"
    left = r.clock.run_eta(r.args.epochs - epoch - 1, stats["epoch_s"])
    share = stats["loss_share_pct"]
    log(msg + f" ({row['img_per_s']:.0f} img/s" + (f", loss {percent_text(share)} of the step" if share is not None else "")
        + (f", run ETA {left})" if left else ")"))
    write_metrics_csv(r)


def write_metrics_csv(r: Run) -> None:
    with open(os.path.join(r.out_dir, "metrics.csv"), "w", newline="") as f:
        fields = list(dict.fromkeys(k for h in r.history for k in h))
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(r.history)


def save_bank_files(r: Run, epoch: int) -> None:
    """Every rank writes its bank rows to bank/epoch-K/; the barrier makes the folder
    complete before the lead's checkpoint.pt names it."""
    import torch.distributed as dist

    r.bank_subdir = os.path.join("bank", f"epoch-{epoch + 1:04d}")
    r.method.save_bank(os.path.join(r.out_dir, r.bank_subdir))
    dist.barrier()


def drop_old_banks(r: Run) -> None:
    bank_root = os.path.join(r.out_dir, "bank")
    for name in os.listdir(bank_root):
        p = os.path.join(bank_root, name)
        if os.path.join("bank", name) != r.bank_subdir:
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def save_checkpoint(r: Run, epoch: int) -> None:
    """The state after ``epoch`` (0-based; -1 = none finished) plus ``r.partial``, a stopped
    epoch's progress. Distributed banks go to per-rank files first; the lead saves checkpoint.pt."""
    scalars = r.method.scalar_state()  # on every rank: tau_e="auto" sums over a distributed bank's ranks
    if r.shared_bank:
        save_bank_files(r, epoch)
    if not r.lead:
        return
    state = {"epoch": epoch, "config": r.cfg, "model": r.model.state_dict(), "optimizer": r.opt.state_dict(),
             "scheduler": r.sched.state_dict(), "method": {} if r.shared_bank else r.method.state_dict(),
             "method_scalars": scalars,
             "data_rng": r.gen.get_state(), "torch_rng": torch.get_rng_state(), "history": r.history,
             "noisy_labels": r.data.labels, "noise_info": r.data.noise_info, "segments": r.segments,
             "grad_scaler": r.speed.state_dict()}
    if r.partial is not None:
        state["partial"] = r.partial
    if r.shared_bank:
        state["bank_dir"] = r.bank_subdir
    if r.proj is not None:
        state["proj"] = r.proj.state_dict()
    if r.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state()
    atomic_save(state, r.ckpt_path)
    if r.shared_bank:
        drop_old_banks(r)


def export_soft_labels(r: Run, log) -> dict | None:
    """--export-soft-labels: the bank's posterior means through the public DPSLoss.export_soft_labels."""
    dps = getattr(r.method, "dps", None)
    if dps is None or r.world > 1:
        why = "no posterior bank in this method" if dps is None else "a distributed bank (--nproc > 1)"
        log(f"[{r.method_name}] --export-soft-labels: {why}, nothing written")
        return None
    path = os.path.join(r.out_dir, "soft_labels.safetensors")
    info = dps.export_soft_labels(path, epoch=len(r.history))
    log(f"[{r.method_name}] soft labels of {len(r.data.labels)} training samples -> {path}")
    return {"path": "soft_labels.safetensors", "bytes": info["bytes"]}


def finish(r: Run, log) -> dict:
    """Label issues (every rank), then final evaluation, loss timing, final.json and plots (lead rank only)."""
    label_issues = write_label_issues(r, log)
    if r.world > 1:
        import torch.distributed as dist

        dist.barrier()
        if not r.lead:
            return {}
    args = r.args
    res, probs = evaluate(r.model, r.data, r.device, args.eval_batch, args.workers, r.speed)
    timing = loss_overhead(r.method, r.model, r.proj, r.loader) if r.world == 1 else \
        no_timing(max(1, args.batch_size // r.world))
    if timing["loss_ms"] is not None:
        log(f"[{r.method_name}] loss part {timing['loss_ms']:.3f} ms vs plain CE {timing['ce_loss_ms']:.3f} ms "
            f"per step of {timing['batch']}; a whole CE step {timing['ce_step_ms']:.2f} ms -> overhead "
            f"{timing['overhead_pct_of_ce_step']:+.1f}% of a CE step")
    timing["loss_share_pct_by_epoch"] = r.clock.shares  # this invocation's epochs (a resumed run: from there)
    final = {"method": r.method_name, "final": res, "history": r.history, "timing": timing,
             "noise": r.data.noise_info, "n_train": len(r.data.labels), "dataset": r.data.name,
             "ood": r.data.ood_name, "config": r.cfg, "segments": r.segments, "model_sha": state_digest(r.model),
             **({"label_issues": label_issues} if label_issues else {})}
    if args.export_soft_labels:
        final["soft_labels"] = export_soft_labels(r, log)
    json_dump(final, os.path.join(r.out_dir, "final.json"))
    if args.plots and r.history:
        save_plots(r.out_dir, r.history, probs, r.data.y_test, f"{r.method_name} on {r.data.name}")
    return final


class StopRequest:
    """Ctrl-C handling of a one-process run: the first SIGINT asks the loop to stop after
    the current batch and checkpoint; a second one raises KeyboardInterrupt at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)  # SIGTERM (a scheduler's stop, `kill`) is treated as Ctrl-C

    def __init__(self, enabled: bool, log=print):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested, self.log, self._old = False, log, {}

    def __enter__(self):
        if self.enabled:
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.requested = True
        for s in self.SIGNALS:
            signal.signal(s, _raise_interrupt)
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        self.log(f"\ndps-train: {name}: stopping after this batch to save a checkpoint (Ctrl-C again to quit at "
                 f"once)")

    def __exit__(self, *exc):
        if self.enabled:
            for s, old in self._old.items():
                signal.signal(s, old if old is not None else signal.default_int_handler)
        return False


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def stopped(r: Run, epoch: int, mid_epoch: bool) -> Interrupted:
    where = (f"{r.partial['done']} batches into epoch {epoch + 1}" if mid_epoch else f"epoch {epoch + 1}")
    return Interrupted(f"[{r.method_name}] interrupted after {where} of {r.args.epochs}; checkpoint saved: "
                       f"{r.ckpt_path}")


def train_epochs(r: Run, log) -> bool:
    """The epoch loop; False when paused by --stop-after. Raises Interrupted on Ctrl-C."""
    with StopRequest(r.world == 1, log) as stop:
        for epoch in range(r.start, r.args.epochs):
            stats = train_epoch(r, epoch, stop)
            if stats is None:
                save_checkpoint(r, epoch - 1)
                raise stopped(r, epoch, mid_epoch=True)
            info = r.method.epoch_info()  # on every rank: a sharded top-k bank's error bound is a collective
            if r.lead:
                record_epoch(r, epoch, stats, info, log)
            save_checkpoint(r, epoch)
            if stop.requested and epoch + 1 < r.args.epochs:
                raise stopped(r, epoch, mid_epoch=False)
            if r.args.stop_after and epoch + 1 == r.args.stop_after:
                log(f"[{r.method_name}] paused after epoch {epoch + 1}/{r.args.epochs} (--stop-after); "
                    f"checkpoint: {r.ckpt_path}")
                return False
    return True


def log_plan(r: Run, log) -> None:
    """The number of steps ahead, before a run starts (the ETA follows after ETA_STEPS steps)."""
    n, world = len(r.data.labels), r.world
    per_epoch = len(r.loader) if world == 1 else -(-(-(-n // world)) // max(1, r.args.batch_size // world))
    epochs = r.args.epochs - r.start
    log(f"[{r.method_name}] {epochs} epoch(s) x {per_epoch} steps of {r.args.batch_size} images = "
        f"{epochs * per_epoch} steps")


def run(args, method_name: str, data: ExperimentData, log=print, rank: int = 0, world: int = 1,
        plan: str = "fresh") -> dict | None:
    """Trains one method from scratch (plan 'fresh' / 'overwrite') or from its checkpoint
    ('resume' / 'complete', see rundir.plan_runs) and writes its files. Returns final.json's
    content, or None when paused by --stop-after."""
    r = build_run(args, method_name, data, rank, world)
    final_path = os.path.join(r.out_dir, "final.json")
    if plan == "complete" and os.path.exists(final_path):
        log(f"[{method_name}] already complete ({args.epochs}/{args.epochs} epochs): {final_path}")
        with open(final_path) as f:
            return json.load(f)
    if plan in ("resume", "complete"):
        restore(r, log)
    else:
        write_run_start(r)
    write_noisy_labels(r)
    log_plan(r, log)
    if not train_epochs(r, log):
        return None
    return finish(r, log)

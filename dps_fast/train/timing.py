"""The cost of a method's loss against plain cross-entropy, measured at the end of a run."""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F


def median_time(fn, reps: int = 15, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def _frozen_outputs(method, model, proj, x, b):
    """Logits (and features) of one batch, detached, as the method's loss sees them."""
    with torch.no_grad():
        model.eval()
        xv = torch.cat([x] * method.views)
        h = model.embed(xv)
        logits = model.head(h).view(method.views, b, -1) if method.views > 1 else model.head(h)
        feats = proj(h).view(method.views, b, -1) if (proj is not None and method.needs_features) else None
        model.train()
    return logits, feats


def loss_overhead(method, model, proj, loader) -> dict:
    """Median time of the loss part (forward + backward through the loss only) of
    this method against plain cross-entropy, and of one whole CE training step."""
    x, y, idx = next(loader.epoch(torch.Generator().manual_seed(0)))
    m = copy.deepcopy(method)
    logits, feats = _frozen_outputs(m, model, proj, x, len(y))
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

    t_m, t_ce, t_step = median_time(method_step), median_time(ce_step), median_time(whole_ce_step)
    return {"loss_ms": 1e3 * t_m, "ce_loss_ms": 1e3 * t_ce, "ce_step_ms": 1e3 * t_step,
            "overhead_pct_of_ce_step": 100 * (t_m - t_ce) / t_step, "batch": len(y)}


def no_timing(batch: int) -> dict:
    """Not measured (--nproc > 1): null in final.json (NaN is not JSON)."""
    return {"loss_ms": None, "ce_loss_ms": None, "ce_step_ms": None, "overhead_pct_of_ce_step": None,
            "batch": batch}


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StepClock:
    """Times the training steps of a run: the DPS loss's share of the step per epoch, and
    the ETA. On CUDA only every ``CUDA_EVERY``-th step is timed, with synchronisation
    (synchronising every step would slow the run it measures)."""
    CUDA_EVERY = 20
    ETA_STEPS, WARMUP_STEPS = 200, 10  # the ETA is printed once, after this many steps of the invocation

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.every = self.CUDA_EVERY if self.cuda else 1
        self.steps, self.on, self.t_warm, self.epoch_times = 0, False, None, []
        self.shares = {}  # epoch (1-based) -> the loss's share of the step, percent
        self.new_epoch()

    def new_epoch(self) -> None:
        self.loss_s = self.step_s = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> "StepClock":
        self.steps += 1
        self.on = self.steps % self.every == 0
        if self.on:
            self.t0 = self._now()
        return self

    def mark(self) -> None:
        if self.on:
            self.t1 = self._now()

    def mark_loss(self) -> None:
        if self.on:
            self.loss_s += self._now() - self.t1

    def stop(self) -> None:
        if self.on:
            self.step_s += self._now() - self.t0
        if self.steps == self.WARMUP_STEPS:
            self.t_warm = time.perf_counter()

    def loss_share_pct(self):
        """Percent of the timed steps spent in the loss's forward (None: no step timed)."""
        return 100 * self.loss_s / self.step_s if self.step_s > 0 else None

    def maybe_eta(self, r, epoch: int, done: int, total: int) -> None:
        """Once, after ETA_STEPS steps: the time per step and the ETAs of the epoch and the run."""
        if self.steps != self.ETA_STEPS or self.t_warm is None:
            return
        per_step = (time.perf_counter() - self.t_warm) / (self.ETA_STEPS - self.WARMUP_STEPS)
        left_epoch = (total - done) * per_step
        left_run = left_epoch + (r.args.epochs - epoch - 1) * total * per_step
        print(f"[{r.method_name}] {per_step * 1e3:.1f} ms/step ({r.args.batch_size / per_step:.0f} img/s) after "
              f"{self.ETA_STEPS} steps: epoch {epoch + 1} ends in ~{format_duration(left_epoch)}, the run in "
              f"~{format_duration(left_run)} (training steps; evaluation adds to it)", flush=True)

    def run_eta(self, epochs_left: int, epoch_s: float) -> str:
        self.epoch_times.append(epoch_s)
        if epochs_left <= 0:
            return ""
        return "~" + format_duration(epochs_left * sum(self.epoch_times) / len(self.epoch_times))

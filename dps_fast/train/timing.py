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
    nan = float("nan")
    return {"loss_ms": nan, "ce_loss_ms": nan, "ce_step_ms": nan, "overhead_pct_of_ce_step": nan, "batch": batch}

"""How far a bank stored in bfloat16 / float16 drifts from a float64 bank (docs/method.md §1).

    python tools/bank_precision.py [--steps 10000] [--rows 3] [--classes 10] [--markdown]

Each of ``--rows`` bank rows (one per seed) starts at the default prior (c = 100 on the
label, eps = 0.01) and receives ``--steps`` updates through the library's own DPS step
(``dps_fast.dps_cross_entropy``, the reference backend, target "posterior"): float32
arithmetic, rounded to the bank dtype on store. The evidence is the softmax of logits
drawn, seeded, from a fixed class-biased distribution (the label +2, a confusable class +1,
noise N(0, 1.5^2)): an average evidence of about 0.5 for the label per step. A float64 bank
takes the same evidence. Reported per (bank dtype, gamma), worst over the rows:

- max target drift: max over steps and classes of |T - T_64|, T the step's target as the
  kernels form it (the float32 row after the update, before rounding, divided by its sum);
- final mass: sum of the stored row after the last step (mean over rows), against float64's
  (gamma^t * 100.09 + (1 - gamma^t) / (1 - gamma); with gamma = 1, 100.09 + steps).
"""
from __future__ import annotations

import argparse

import torch

import dps_fast

PRIOR_C, PRIOR_EPS = 100.0, 0.01


def evidence_logits(steps: int, rows: int, classes: int, seed: int) -> torch.Tensor:
    """[steps, rows, classes] logits: label (class 0) +2, class 1 +1, N(0, 1.5^2) noise."""
    gen = torch.Generator().manual_seed(seed)
    bias = torch.zeros(classes)
    bias[0], bias[1] = 2.0, 1.0
    return bias + 1.5 * torch.randn(steps, rows, classes, generator=gen, dtype=torch.float64)


def run(bank_dtype: torch.dtype, gamma: float, z: torch.Tensor):
    """(max |T - T_64| per row, final stored mass per row, final float64 mass per row)."""
    steps, rows, classes = z.shape
    labels = torch.zeros(rows, dtype=torch.int64)
    alpha = dps_fast.init_prior(labels, classes, c=PRIOR_C, eps=PRIOR_EPS, dtype=bank_dtype)
    alpha64 = dps_fast.init_prior(labels, classes, c=PRIOR_C, eps=PRIOR_EPS, dtype=torch.float64)
    idx = torch.arange(rows)
    drift = torch.zeros(rows, dtype=torch.float64)
    for s in range(steps):
        z32 = z[s].float()
        # the step's target as every backend forms it (docs/method.md §2, step 3)
        a_new = gamma * alpha.float() + torch.softmax(z32, -1)
        target = a_new / a_new.sum(-1, keepdim=True)
        dps_fast.dps_cross_entropy(z32, idx, alpha, gamma=gamma, backend="reference")
        dps_fast.dps_cross_entropy(z32.double(), idx, alpha64, gamma=gamma, backend="reference")
        target64 = alpha64 / alpha64.sum(-1, keepdim=True)
        drift = torch.maximum(drift, (target.double() - target64).abs().amax(-1))
    return drift, alpha.double().sum(-1), alpha64.sum(-1)


def table(steps: int, rows: int, classes: int, dtypes, gammas, seed: int = 0):
    z = evidence_logits(steps, rows, classes, seed)
    out = []
    for gamma in gammas:
        for dt in dtypes:
            drift, mass, mass64 = run(dt, gamma, z)
            out.append(dict(dtype=str(dt).replace("torch.", ""), gamma=gamma, drift=float(drift.max()),
                            mass=float(mass.mean()), mass64=float(mass64.mean())))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--rows", type=int, default=3, help="independent rows (seeds of the evidence)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--gammas", default="0.9,0.95,1.0")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    rows = table(a.steps, a.rows, a.classes, dtypes, [float(g) for g in a.gammas.split(",")], a.seed)
    print(f"{a.steps} updates, {a.rows} rows, C = {a.classes}, prior c = {PRIOR_C:g}, eps = {PRIOR_EPS:g}")
    print("| gamma | bank dtype | max target drift | final mass | float64 mass |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['gamma']:g} | {r['dtype']} | {r['drift']:.2e} | {r['mass']:.6g} | {r['mass64']:.6g} |")


if __name__ == "__main__":
    main()

"""The top-k bank against the dense bank at large C, on a synthetic teacher (issue 26, item 8;
docs/results.md section 7b): both banks get the same logits every step, and after each epoch
the tool measures the total-variation distance between their targets, row by row, next to
the bound the top-k bank reports (``crit.topk_error()``, docs/method.md §12).

The teacher: each sample has a true class; 20% of the given labels are wrong (another class,
uniformly). Each sample has fixed teacher logits: ``margin`` on the true class, ``confuser``
on ``confusers`` other classes (its look-alikes), plus ``spread`` * N(0, 1) on every class:
"peaked" puts the softmax on the true class and 4 look-alikes (a trained classifier's
top-5), "flat" on the true class and a near-uniform tail, "heavy-tailed" on hundreds of
unequal classes (spread 2 over C: the worst case for a top-k row).
The model at epoch e (of E) sees ``(e / E) * teacher + 0.5 * N(0, 1)``, fresh noise each
step: a learner whose evidence sharpens, so the top-k classes change as it trains.

    python tools/topk_sim.py                       # C = 1000 and 10,000, k = 1, 4, 16, 64
    python tools/topk_sim.py --c 1000 --k 2,4 --epochs 20 --n 512
    python tools/topk_sim.py --values bfloat16,float16     # + 16-bit values against float32 ones
"""
import argparse
import statistics
import time

import torch

import dps_fast

TEACHERS = {"peaked": {"margin": 12.0, "confusers": 4, "confuser": 9.0, "spread": 1.0},
            "flat": {"margin": 6.0, "confusers": 0, "confuser": 0.0, "spread": 1.0},
            "heavy-tailed": {"margin": 4.0, "confusers": 0, "confuser": 0.0, "spread": 2.0}}


def synthetic_task(n: int, c: int, noise: float, seed: int, margin: float, confusers: int, confuser: float,
                   spread: float):
    """(given labels [n], teacher logits [n, c]) of the module docstring's teacher."""
    gen = torch.Generator().manual_seed(seed)
    true = torch.randint(0, c, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < noise
    other = (true + torch.randint(1, c, (n,), generator=gen)) % c  # a different class, uniformly
    given = torch.where(flip, other, true)
    teacher = spread * torch.randn(n, c, generator=gen)
    if confusers:
        offsets = torch.rand(n, c - 1, generator=gen).topk(confusers, 1).indices + 1  # distinct, never 0
        look_alikes = (true[:, None] + offsets) % c
        teacher.scatter_add_(1, look_alikes, torch.full((n, confusers), confuser))
    teacher[torch.arange(n), true] += margin
    return given, teacher


def tv_per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a.double() - b.double()).abs().sum(1)


def simulate(args, c: int, teacher_kind: str, k_values: list[int]) -> list[dict]:
    """One dense bank and one top-k bank per k, stepped on the same logits; per k, the mean
    TV to the dense targets after every epoch, and the bank's own bound."""
    given, teacher = synthetic_task(args.n, c, args.noise, args.seed, **TEACHERS[teacher_kind])
    dense = dps_fast.DPSLoss(given, c, tau_e=1.0)  # a fixed tau_e: the banks differ only in format
    topk = {k: dps_fast.DPSLoss(given, c, tau_e=1.0, top_k=k) for k in k_values}
    narrow = {(k, dt): dps_fast.DPSLoss(given, c, tau_e=1.0, top_k=k, bank_dtype=getattr(torch, dt))
              for k in k_values for dt in args.values}  # the same k with 16-bit values
    gen = torch.Generator().manual_seed(args.seed + 1)
    curves = {k: [] for k in k_values}
    for epoch in range(1, args.epochs + 1):
        for idx in torch.randperm(args.n, generator=gen).split(args.batch):
            z = epoch / args.epochs * teacher[idx] + 0.5 * torch.randn(len(idx), c, generator=gen)
            dense(z, idx)
            for crit in list(topk.values()) + list(narrow.values()):
                crit(z, idx)
        reference = dense.targets()
        for k, crit in topk.items():
            curves[k].append(float(tv_per_row(crit.targets(), reference).mean()))
    rows = []
    for k, crit in topk.items():
        err = crit.topk_error()
        tv_final = tv_per_row(crit.targets(), reference)
        bound = crit.store.bound / (2 * (crit.store.vals.sum(1) + crit.store.rest))
        tail = 1 - torch.softmax(teacher, 1).topk(k, 1).values.sum(1).mean()
        drift = {dt: tv_per_row(narrow[k, dt].targets(), crit.targets()) for dt in args.values}
        rows.append({"C": c, "teacher": teacher_kind, "k": k, "tail": float(tail), "peak_tv": max(curves[k]),
                     "values_drift": {dt: (float(d.mean()), float(d.max())) for dt, d in drift.items()},
                     "final_tv": curves[k][-1], "mean_tv_bound": err["mean_tv_bound"],
                     "max_tv_bound": err["max_tv_bound"],
                     "bound_holds": bool((tv_final <= bound.double() + 1e-6).all())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--c", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10_000])
    ap.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    ap.add_argument("--teachers", type=lambda s: s.split(","), default=list(TEACHERS))
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--values", type=lambda s: [x for x in s.split(",") if x], default=[],
                    help="16-bit value dtypes (bfloat16, float16) to compare with float32 values, the same k")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    print(f"N = {args.n}, batch {args.batch}, {args.epochs} epochs, {args.noise:.0%} wrong labels, "
          f"teachers: {TEACHERS}")
    print("| C | teacher | k | teacher's mass outside its top k | mean TV, peak over epochs | mean TV, last epoch "
          "| bound: mean / max | TV <= bound, every row |")
    print("|---|---|---|---|---|---|---|---|")
    drifts = []
    for c in args.c:
        for kind in args.teachers:
            t0 = time.perf_counter()
            rows = simulate(args, c, kind, [k for k in args.k if k < c])
            for r in rows:
                print(f"| {r['C']:,} | {r['teacher']} | {r['k']} | {r['tail']:.3f} | {r['peak_tv']:.4f} | {r['final_tv']:.4f} | "
                      f"{r['mean_tv_bound']:.4f} / {r['max_tv_bound']:.4f} | {'yes' if r['bound_holds'] else 'NO'} |",
                      flush=True)
            print(f"<!-- C = {c}, {kind}: {time.perf_counter() - t0:.0f} s -->", flush=True)
            drifts += [(c, kind, r["k"], dt, *v) for r in rows for dt, v in r["values_drift"].items()]
    if drifts:
        print("\n| C | teacher | k | values | TV to float32 values, mean | max |\n|---|---|---|---|---|---|")
        for c, kind, k, dt, mean, worst in drifts:
            print(f"| {c:,} | {kind} | {k} | {dt} | {mean:.2e} | {worst:.2e} |")


if __name__ == "__main__":
    main()

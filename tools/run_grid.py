"""Run the Fashion-MNIST results grid of docs/results.md and aggregate it.

    python tools/run_grid.py --out runs/grid --workers 2          # run (resumable) + aggregate
    python tools/run_grid.py --out runs/grid --aggregate-only     # just the tables

Every (setting, seed, method) is one `dps-train` run with one CPU thread; `--workers`
runs go side by side. Finished runs (final.json present) are skipped, interrupted
ones resume from their checkpoint, so the grid can be stopped and restarted.
"""
import argparse
import itertools
import json
import math
import os
import subprocess
import sys

# the installed console script: `python -m dps_fast.train` from the repo root would import the
# source tree (no compiled extension) instead of the installed package
DPS_TRAIN = os.path.join(os.path.dirname(sys.executable), "dps-train")
import time
from concurrent.futures import ThreadPoolExecutor

SETTINGS = {"clean": [], "sym40": ["--noise", "sym", "--noise-rate", "0.4"],
            "asym40": ["--noise", "asym", "--noise-rate", "0.4"]}
METHODS = ["ce", "ls", "pskd", "te", "dps", "dps+con"]


def job_cmd(a, setting, seed, method):
    out = os.path.join(a.out, setting, f"seed{seed}")
    cmd = [DPS_TRAIN, "--dataset", "fashion-mnist", "--model", a.model,
           "--width", str(a.width), "--blocks", str(a.blocks), "--train-subset", str(a.subset),
           "--epochs", str(a.epochs), "--method", method, "--seed", str(seed), "--threads", "1",
           "--eval-every", str(a.eval_every), "--out", out, "--no-plots", "--no-progress",
           "--batch-size", str(a.batch_size), "--lr", str(a.lr),
           "--augment" if a.augment else "--no-augment"] + SETTINGS[setting] + a.extra
    if os.path.exists(os.path.join(out, method, "checkpoint.pt")):
        cmd.append("--resume")  # continue an interrupted run (dps-train refuses --resume without one)
    return cmd, os.path.join(out, method, "final.json")


def run_all(a):
    # seed-major order: one full seed over every setting first, so a partial grid is still balanced
    jobs = [(st, sd, m) for sd, st, m in itertools.product(a.seeds, a.settings, a.methods)]
    log = open(os.path.join(a.out, "grid.log"), "a")

    def one(job):
        cmd, final = job_cmd(a, *job)
        if os.path.exists(final):
            return job, "done before", 0.0
        t0 = time.time()
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        dt = time.time() - t0
        log.write(f"=== {job} rc={r.returncode} {dt:.0f}s\n{r.stdout[-3000:]}\n")
        log.flush()
        return job, f"rc={r.returncode}", dt

    with ThreadPoolExecutor(a.workers) as ex:
        for k, (job, status, dt) in enumerate(ex.map(one, jobs), 1):
            print(f"[{k}/{len(jobs)}] {job} {status} {dt:.0f}s", flush=True)


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None, 0
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s, len(xs)


def aggregate(a):
    rows = []
    for st in a.settings:
        for m in a.methods:
            finals = []
            for sd in a.seeds:
                p = os.path.join(a.out, st, f"seed{sd}", m, "final.json")
                if os.path.exists(p):
                    with open(p) as f:
                        finals.append(json.load(f))
            if not finals:
                continue
            agg = {"setting": st, "method": m, "n": len(finals),
                   "noise_realised": finals[0]["noise"].get("realised", 0.0)}
            for key, scale in (("accuracy", 100), ("ece_pct", 1), ("nll", 1), ("ood_auroc", 1)):
                agg[key] = mean_std([f["final"].get(key) * scale if f["final"].get(key) is not None else None
                                     for f in finals])
            agg["overhead_pct"] = mean_std([f["timing"]["overhead_pct_of_ce_step"] for f in finals])
            # accuracy on the (noisy) training labels at the last epoch: ~100% means memorised
            agg["train_acc"] = mean_std([100 * f["history"][-1]["train_acc"] for f in finals
                                         if f.get("history") and "train_acc" in f["history"][-1]])
            rows.append(agg)
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(rows, f, indent=2)
    lines = []
    for st in a.settings:
        sel = [r for r in rows if r["setting"] == st]
        if not sel:
            continue
        lines += [f"\n#### {st} (realised wrong labels: {100 * sel[0]['noise_realised']:.1f}%)\n",
                  "| method | seeds | accuracy % | ECE % (15 bins) | NLL | OOD AUROC (MNIST) | train acc % (noisy labels) |",
                  "|---|---|---|---|---|---|---|"]
        for r in sel:
            def f(k, d=2):
                m, s, n = r[k]
                if m is None:
                    return "n/a"
                return f"{m:.{d}f} ± {s:.{d}f}" if n > 1 else f"{m:.{d}f}"
            lines.append(f"| {r['method']} | {r['n']} | {f('accuracy')} | {f('ece_pct')} | {f('nll', 3)} | "
                         f"{f('ood_auroc', 3)} | {f('train_acc', 1)} |")
    table = "\n".join(lines)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/grid")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--subset", type=int, default=5000)
    p.add_argument("--model", default="resnet", help="resnet (the grid) or mlp (--width 256 for the MLP stand-in)")
    p.add_argument("--width", type=int, default=12)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--augment", action="store_true", help="random crop + flip (off: CE must over-fit)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--methods", type=lambda s: s.split(","), default=METHODS)
    p.add_argument("--settings", type=lambda s: s.split(","), default=list(SETTINGS))
    p.add_argument("--aggregate-only", action="store_true")
    p.add_argument("extra", nargs="*", help="extra dps-train arguments (after --)")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if not a.aggregate_only:
        run_all(a)
    aggregate(a)


if __name__ == "__main__":
    main()

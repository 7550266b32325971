"""The table of a results/tau-auto-*-run.sh folder: one row per run name, mean +- std over seeds
of the final test accuracy %, ECE % (15 bins) and mean confidence %, and tau_e at the end.

    python results/tau_auto_table.py runs/tau-auto-digits
"""
import glob
import json
import os
import statistics
import sys


def fmt(xs):
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"


def main(folder):
    print("| run | seeds | acc % | ECE % | mean confidence % | tau_e at the end |\n|---|---|---|---|---|---|")
    for name in sorted(os.listdir(folder)):
        finals = sorted(glob.glob(os.path.join(folder, name, "seed*", "*", "final.json")))
        if not finals:
            continue
        docs = [json.load(open(f)) for f in finals]
        acc = [100 * d["final"]["accuracy"] for d in docs]
        ece = [d["final"]["ece_pct"] for d in docs]
        conf = [100 * d["final"].get("mean_confidence", float("nan")) for d in docs]
        taus = sorted({round(float(d["history"][-1].get("tau_e", d["config"]["tau_e"])), 2) for d in docs
                       if d["method"] != "ce"})
        tau = "" if not taus else f"{taus[0]:g}" if len(taus) == 1 else f"{taus[0]:g}–{taus[-1]:g}"
        print(f"| {name} | {len(docs)} | {fmt(acc)} | {fmt(ece)} | {fmt(conf)} | {tau} |")


if __name__ == "__main__":
    main(sys.argv[1])

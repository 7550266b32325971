"""The table of docs/results.md section 7a from a results/topk-grid-run.sh folder: per setting
and bank (dense, top-k), mean ± std over seeds of test accuracy, ECE, the label-issue F1 and
AUROC against the flipped labels, the final tau_e and the top-k bank's own mean TV bound.

    python results/topk_grid_table.py runs/topk-grid
"""
import glob
import json
import os
import statistics
import sys

BANKS = ["dense", "top2", "top3", "top5"]
SETTINGS = ["clean", "sym40", "asym40"]


def cell(xs, scale=1.0, digits=2):
    xs = [scale * x for x in xs if x is not None]
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f}"


def finals(root, bank, setting):
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(root, bank, setting, "seed*", "dps", "final.json")))]


def main(root):
    print("| setting | bank | seeds | accuracy % | ECE % | label-issue F1 | label-issue AUROC | tau_e at the end "
          "| mean TV bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    for setting in SETTINGS:
        for bank in BANKS:
            fs = finals(root, bank, setting)
            if not fs:
                continue
            flips = [f.get("label_issues", {}).get("against_flip_mask") for f in fs]
            last = [f["history"][-1] for f in fs]
            f1 = cell([x["f1"] for x in flips if x], digits=3) if any(flips) else "–"
            auroc = cell([x["auroc"] for x in flips if x], digits=3) if any(flips) else "–"
            bound = cell([h.get("topk_mean_tv_bound") for h in last], digits=3) if bank != "dense" else "–"
            print(f"| {setting} | {bank} | {len(fs)} | {cell([f['final']['accuracy'] for f in fs], 100)} | "
                  f"{cell([f['final']['ece_pct'] for f in fs])} | {f1} | {auroc} | "
                  f"{cell([h['tau_e'] for h in last])} | {bound} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/topk-grid")

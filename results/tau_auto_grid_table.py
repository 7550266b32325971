"""Issue 27's grid table: CE, DPS with a fixed tau_e = 1 and DPS with tau_e="auto" (the
default), final test accuracy % and ECE % (15 bins), mean ± std over 3 seeds, and whether
each acceptance target is met. From the repository root:

    python results/tau_auto_grid_table.py --ce results/grid --fixed runs/grid-fixed \
        --auto runs/grid-auto --title ResNet
"""
import argparse
import json
import os
import statistics


def cell(folder, setting, method):
    vals = []
    for seed in range(3):
        p = os.path.join(folder, setting, f"seed{seed}", method, "final.json")
        if os.path.exists(p):
            f = json.load(open(p))["final"]
            vals.append((100 * f["accuracy"], f["ece_pct"]))
    return vals


def ms(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(vals):
    if not vals:
        return "(not run)"
    (a, sa), (e, se) = ms([v[0] for v in vals]), ms([v[1] for v in vals])
    return f"{a:.2f} ± {sa:.2f} / {e:.2f} ± {se:.2f}" + ("" if len(vals) == 3 else f" ({len(vals)} seeds)")


def verdict(setting, ce, fixed, auto):
    if not (ce and fixed and auto):
        return ""
    acc = lambda v: ms([x[0] for x in v])[0]  # noqa: E731
    ece = lambda v: ms([x[1] for x in v])[0]  # noqa: E731
    if setting == "clean":
        # "within": no worse by more than that (better is not a miss)
        checks = [("acc >= fixed - 0.3", acc(auto) >= acc(fixed) - 0.3),
                  ("ECE <= fixed + 0.5", ece(auto) <= ece(fixed) + 0.5)]
    else:
        checks = [("ECE <= half of fixed", ece(auto) <= ece(fixed) / 2), ("ECE <= CE + 1", ece(auto) <= ece(ce) + 1),
                  ("acc >= fixed", acc(auto) >= acc(fixed))]
    return "; ".join(f"{name}: {'yes' if ok else 'no'}" for name, ok in checks)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ce", required=True)
    p.add_argument("--fixed", required=True)
    p.add_argument("--auto", required=True)
    p.add_argument("--title", default="")
    a = p.parse_args()
    print(f"| {a.title} setting | CE | DPS, tau_e = 1 (as published) | DPS, tau_e auto (default) | targets |")
    print("|---|---|---|---|---|")
    for s in ("clean", "sym40", "asym40"):
        ce, fixed, auto = cell(a.ce, s, "ce"), cell(a.fixed, s, "dps"), cell(a.auto, s, "dps")
        print(f"| {s} | {fmt(ce)} | {fmt(fixed)} | {fmt(auto)} | {verdict(s, ce, fixed, auto)} |")


if __name__ == "__main__":
    main()

"""Sweep DPS's prior concentration c and discount gamma on one dataset.

    python tools/sweep_c_gamma.py --out runs/sweep-digits -- --dataset digits --model mlp --epochs 40

Runs `dps-train --method dps` for every (c, gamma), clean and with 40% symmetric
noise, plus the CE baseline of each setting; prints and writes a markdown table of
final test accuracy, ECE (15 bins) and NLL.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys

# the installed console script: `python -m dps_fast.train` from the repo root would import the
# source tree (no compiled extension) instead of the installed package
DPS_TRAIN = os.path.join(os.path.dirname(sys.executable), "dps-train")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cs", default="1,10,100,1000")
    p.add_argument("--gammas", default="0.9,0.95,0.99")
    p.add_argument("--noise", default="none,sym")
    p.add_argument("extra", nargs="*")
    a = p.parse_args()
    rows = []
    for noise in a.noise.split(","):
        nz = [] if noise == "none" else ["--noise", noise, "--noise-rate", "0.4"]
        grid = [("ce", None, None)] + [("dps", float(c), float(g)) for c, g in
                                       itertools.product(a.cs.split(","), a.gammas.split(","))]
        for method, c, g in grid:
            name = method if c is None else f"dps_c{c:g}_g{g:g}"
            out = os.path.join(a.out, noise, name)
            final = os.path.join(out, method, "final.json")
            if not os.path.exists(final):
                cmd = [DPS_TRAIN, "--method", method, "--out", out, "--no-plots",
                       "--no-progress", "--threads", "1"] + nz + a.extra
                if c is not None:
                    cmd += ["--c", str(c), "--gamma", str(g)]
                if os.path.exists(os.path.join(out, method, "checkpoint.pt")):
                    cmd.append("--resume")  # an interrupted run: continue it (dps-train never overwrites one)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(final) as f:
                r = json.load(f)["final"]
            rows.append((noise, name, c, g, 100 * r["accuracy"], r["ece_pct"], r["nll"]))
            print(rows[-1], flush=True)
    lines = ["| noise | run | c | gamma | acc % | ECE % (15 bins) | NLL |", "|---|---|---|---|---|---|---|"]
    for noise, name, c, g, acc, ece, nll in rows:
        lines.append(f"| {noise} | {name} | {'' if c is None else f'{c:g}'} | {'' if g is None else f'{g:g}'} | "
                     f"{acc:.2f} | {ece:.2f} | {nll:.4f} |")
    md = "\n".join(lines)
    with open(os.path.join(a.out, "sweep.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()

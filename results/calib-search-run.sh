#!/bin/bash
# The MLP search of docs/results.md section 5 (issue #15). Run from the repository root:
#   bash results/calib-search-run.sh            # results in runs/calib (resumable: done runs are skipped)
#   .venv/bin/python tools/calib_search.py --table runs/calib
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824
P="nice -n 19 .venv/bin/python tools/calib_search.py --out runs/calib"
SEEDS=${SEEDS:-0}
for seed in $SEEDS; do
  for s in clean sym40 asym40; do
    run() { $P --setting $s --seed $seed "$@"; }
    run --method ce
    run --method dps
    for t in 0.5 0.7 0.85; do run --tau-t $t; done          # target temperature
    for t in 0.5 0.7; do run --tau-e $t; done               # evidence temperature
    run --plc --plc-tau 0.5; run --plc --plc-tau 0          # ProSelfLC-style, entropy adaptive
    run --w0 1 --w1 3; run --w0 1 --w1 0.3                  # evidence-mass schedule
  done
done
# second round: noise-adaptive evidence temperature, and combinations
for seed in $SEEDS; do
  for s in clean sym40 asym40; do
    run() { $P --setting $s --seed $seed "$@"; }
    for k in 1 1.5 2; do run --adapt $k; done
    run --tau-e 0.7 --w0 1 --w1 3
  done
done
# third round: the adaptive evidence temperature driven by the bank's mean label-error score
for seed in $SEEDS; do
  for s in clean sym40 asym40; do
    run() { $P --setting $s --seed $seed "$@"; }
    for k in 1.5 2; do run --adapt $k --adapt-from score; done
  done
done

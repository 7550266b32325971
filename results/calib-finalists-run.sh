#!/bin/bash
# The finalists of the MLP search (docs/results.md section 5), 3 seeds. From the repository root:
#   bash results/calib-finalists-run.sh; .venv/bin/python tools/calib_search.py --table runs/calib
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824
P="nice -n 19 .venv/bin/python tools/calib_search.py --out runs/calib"
for seed in 0 1 2; do
  for s in clean sym40 asym40; do
    run() { $P --setting $s --seed $seed "$@"; }
    run --method ce
    run --method dps
    run --tau-e 0.5
    run --tau-e 0.7
    run --tau-e 0.7 --w0 1 --w1 3
    run --adapt 2 --adapt-from score
  done
done

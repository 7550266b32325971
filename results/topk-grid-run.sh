#!/bin/bash
# The top-k bank against the dense bank on Fashion-MNIST (issue 26, item 8; docs/results.md
# section 7): the grid's MLP stand-in (2 x 256, 5,000 training images, 50 epochs, no
# augmentation, batch 128, SGD lr 0.05), clean / sym40 / asym40, seeds 0-2, DPS with every
# default (tau_e auto) and --label-issues; dense, then top-k with k = 2, 3, 5 of 10 classes.
# From the repository root (about 13 minutes on one core):
#   bash results/topk-grid-run.sh
#   .venv/bin/python results/topk_grid_table.py runs/topk-grid
export MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=65536
OUT=${OUT:-runs/topk-grid}
PY=${PY:-.venv/bin/python}
grid() {  # name, then dps-train arguments
  $PY tools/run_grid.py --out "$OUT/$1" --workers 1 --model mlp --width 256 --methods dps \
    -- --label-issues "${@:2}"
}
grid dense
for k in 2 3 5; do grid top$k --top-k $k; done

#!/bin/bash
# The ResNet confirmation of docs/results.md section 5 (the tool loop in the grid's setting: width 12,
# 1 block, 5k subset, 50 epochs, no augmentation), the MLP search's candidate: the noise-adaptive
# evidence temperature tau_e = max(0.1, 1 - 2 * mean label-error score of the bank), set every epoch.
# From the repository root; resumable (--checkpoint). Table: tools/calib_search.py --table runs/calib
cd "$(dirname "$0")/.."
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824
P="nice -n 19 .venv/bin/python tools/calib_search.py --out runs/calib --model resnet --width 12 --blocks 1
   --checkpoint --log-every 10 --threads 1 --adapt 2 --adapt-from score"
for s in sym40 clean asym40; do
  for seed in 0 1 2; do $P --setting $s --seed $seed; done
done

#!/bin/bash
# The contrastive term, one more try (docs/results.md section 6): augmented views, a wider ResNet,
# a longer schedule, 40% symmetric noise. From the repository root: bash docs/results/con-resnet-run.sh
# (results in runs/con-resnet; resumable: every run continues from its checkpoint).
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824
T=${DPS_TRAIN:-$PWD/.venv/bin/dps-train}  # the installed console script
base="--dataset fashion-mnist --model resnet --width 16 --blocks 1 --train-subset 5000 --epochs 60 --augment
      --noise sym --noise-rate 0.4 --threads 1 --eval-every 10 --no-plots --no-progress --resume"
run() { out=runs/con-resnet/seed$2; [ -f $out/$1/final.json ] || nice -n 19 $T $base --method $1 --seed $2 --out $out \
        > runs/con-resnet/$1-seed$2.log 2>&1; echo "$1 seed $2 done"; }
mkdir -p runs/con-resnet
run ce 0        # the memorisation check: CE's accuracy on the noisy training labels
for seed in 0 1 2; do run dps $seed; run dps+con $seed; done
.venv/bin/python tools/posthoc_temperature.py runs/con-resnet --out runs/con-resnet/temperature.json

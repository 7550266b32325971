#!/bin/bash
# The contrastive term, one more try (docs/results.md section 6): augmented views, a wider ResNet,
# a longer schedule, 40% symmetric noise. From the repository root: bash results/con-resnet-run.sh
# (results in runs/con-resnet; resumable: every run continues from its checkpoint). Two streams of one
# thread each, balanced by cost (a DPS+con step runs two views, about twice a DPS step).
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824
T=${DPS_TRAIN:-$PWD/.venv/bin/dps-train}  # the installed console script
base="--dataset fashion-mnist --model resnet --width 16 --blocks 1 --train-subset 5000 --epochs 60 --augment
      --noise sym --noise-rate 0.4 --threads 1 --eval-every 10 --no-plots --no-progress"
run() { out=runs/con-resnet/seed$2; r=; [ -f $out/$1/checkpoint.pt ] && r=--resume
        [ -f $out/$1/final.json ] || nice -n 19 $T $base $r --method $1 --seed $2 --out $out \
        >> runs/con-resnet/$1-seed$2.log 2>&1; echo "$1 seed $2 done $(date -u +%H:%M)"; }
mkdir -p runs/con-resnet
# CE is the baseline and the memorisation check (its accuracy on the noisy training labels).
(run ce 0; run dps 0; run dps+con 1; run dps 2; run ce 2) &
(run dps+con 0; run dps 1; run dps+con 2; run ce 1) &
wait
.venv/bin/python tools/posthoc_temperature.py runs/con-resnet --out runs/con-resnet/temperature.json

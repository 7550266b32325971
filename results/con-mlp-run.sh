#!/bin/bash
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824
# run from the repository root: bash results/con-mlp-run.sh (results in runs/con-mlp)
T=${DPS_TRAIN:-$PWD/.venv/bin/dps-train}  # the installed console script
mkdir -p runs/con-mlp && cd runs/con-mlp
base="--dataset fashion-mnist --model mlp --train-subset 5000 --epochs 50 --eval-every 50 --threads 1 --no-plots --no-progress --noise sym --noise-rate 0.4"
run() { name=$1; shift; [ -f $name/*/final.json ] || nice -n 5 $T $base --out $name "$@" > $name.log 2>&1; echo "$name done"; }
run ce_noaug --method ce --no-augment
run dps_noaug --method dps --no-augment
run con_noaug_hard --method dps+con --no-augment
run con_noaug_soft --method dps+con --no-augment --con-positives soft
run con_noaug_w1 --method dps+con --no-augment --con-weight 1.0
run ce_aug --method ce --augment
run dps_aug --method dps --augment
run con_aug_hard --method dps+con --augment
run con_aug_soft --method dps+con --augment --con-positives soft
run con_aug_views --method dps+con --augment --con-positives views

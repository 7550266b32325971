#!/bin/bash
# tau_e="auto" on digits through dps-train (docs/results.md section 6, issue 27): the trainer's
# digits defaults (MLP 2 x 256, 30 epochs, batch 128, SGD lr 0.05, weight decay 5e-4, augment),
# 30% symmetric noise (26.7% of the labels wrong) and clean labels; the schedule (30, 60, 100
# epochs), the prior (c 10, 30) and augmentation varied. 3 seeds each. From the repository root:
#   bash results/tau-auto-digits-run.sh            # about 10 minutes on one core
#   .venv/bin/python results/tau_auto_table.py runs/tau-auto-digits
export MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=65536
OUT=${OUT:-runs/tau-auto-digits}
run() {  # name, then dps-train arguments
  local name=$1; shift
  for seed in 0 1 2; do
    [ -f "$OUT/$name/seed$seed/done" ] && continue
    .venv/bin/dps-train --dataset digits --seed $seed --threads 1 --no-plots --no-progress \
      --out "$OUT/$name/seed$seed" --overwrite "$@" > "$OUT/$name.seed$seed.log" 2>&1 && touch "$OUT/$name/seed$seed/done"
  done
}
mkdir -p "$OUT"
NOISE="--noise sym --noise-rate 0.3"
for epochs in 30 60 100; do
  run sym30-e$epochs-ce $NOISE --epochs $epochs --method ce
  run sym30-e$epochs-fixed $NOISE --epochs $epochs --method dps --tau-e 1
  run sym30-e$epochs-auto $NOISE --epochs $epochs --method dps --tau-e auto
done
for epochs in 30 100; do
  run clean-e$epochs-ce --epochs $epochs --method ce
  run clean-e$epochs-fixed --epochs $epochs --method dps --tau-e 1
  run clean-e$epochs-auto --epochs $epochs --method dps --tau-e auto
done
for c in 10 30; do
  run sym30-e30-c$c-fixed $NOISE --c $c --method dps --tau-e 1
  run sym30-e30-c$c-auto $NOISE --c $c --method dps --tau-e auto
done
run sym30-e30-noaug-ce $NOISE --no-augment --method ce
run sym30-e30-noaug-fixed $NOISE --no-augment --method dps --tau-e 1
run sym30-e30-noaug-auto $NOISE --no-augment --method dps --tau-e auto
# the top-k bank (k = 3 of 10 classes) at the schedule where tau_e auto works
run sym30-e100-topk3-fixed $NOISE --epochs 100 --top-k 3 --method dps --tau-e 1
run sym30-e100-topk3-auto $NOISE --epochs 100 --top-k 3 --method dps --tau-e auto

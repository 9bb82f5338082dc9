#!/usr/bin/env bash
# Split CIFAR-10 (the JPEG-q75 copy) and ImageNet-50 (Tiny-ImageNet source) for naive, ewc,
# lwf, replay, HAT (hat_tc in the class setting) and ccgn in both settings: small CNN
# (width 32) on 32x32 RGB, 1 epoch per task.
# Usage: scripts/image_tables.sh DATA_ROOT RESULTS_DIR [SEED ...]
set -euo pipefail
data_root=$1; results=$2; shift 2
seeds=${*:-0}
declare -A strategies=([task]="naive ewc lwf replay hat ccgn" [class]="naive ewc lwf replay hat_tc ccgn")
for scenario in split_cifar10_jpeg imagenet50; do
  for seed in $seeds; do
    for setting in task class; do
      for strategy in ${strategies[$setting]}; do
        [ -f "$results/$scenario/$setting/$strategy/seed$seed/COMPLETED" ] && continue
        clbench run --scenario "$scenario" --data-root "$data_root" --results-dir "$results" \
          --backbone small_cnn --width 32 --strategy "$strategy" --setting "$setting" --seed "$seed"
      done
    done
  done
done
clbench table "$results" --output "$results/table.md"

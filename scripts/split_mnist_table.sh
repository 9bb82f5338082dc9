#!/usr/bin/env bash
# Split MNIST (full data): every baseline, ccgn and HAT in both settings, 1 epoch per task.
# Usage: scripts/split_mnist_table.sh DATA_ROOT RESULTS_DIR [SEED ...]
# Writes RESULTS_DIR/<scenario>/<setting>/<strategy>/seed<N>/ and RESULTS_DIR/table.md;
# finished runs are skipped, so an interrupted script picks up where it stopped.
set -euo pipefail
data_root=$1; results=$2; shift 2
seeds=${*:-0}
declare -A strategies=(
  [task]="naive joint ewc si lwf replay agem gem ccgn hat"
  [class]="naive joint ewc si lwf replay agem gem icarl ccgn hat_tc"
)
for seed in $seeds; do
  for setting in task class; do
    for strategy in ${strategies[$setting]}; do
      [ -f "$results/split_mnist/$setting/$strategy/seed$seed/COMPLETED" ] && continue
      clbench run --scenario split_mnist --data-root "$data_root" --results-dir "$results" \
        --strategy "$strategy" --setting "$setting" --seed "$seed"
    done
  done
done
clbench table "$results" --output "$results/table.md"

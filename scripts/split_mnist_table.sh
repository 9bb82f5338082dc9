#!/usr/bin/env bash
# Split MNIST (full data) for every baseline and ccgn in both settings, 1 epoch per task.
# Usage: scripts/split_mnist_table.sh DATA_ROOT RESULTS_DIR [SEED ...]
# Writes RESULTS_DIR/<scenario>/<setting>/<strategy>/seed<N>/ and RESULTS_DIR/table.md.
set -euo pipefail
data_root=$1; results=$2; shift 2
seeds=${*:-0}
for seed in $seeds; do
  for setting in task class; do
    for strategy in naive joint ewc si lwf replay agem gem icarl ccgn; do
      if [ "$strategy" = icarl ] && [ "$setting" = task ]; then continue; fi
      [ -f "$results/split_mnist/$setting/$strategy/seed$seed/COMPLETED" ] && continue
      clbench run --scenario split_mnist --data-root "$data_root" --results-dir "$results" \
        --strategy "$strategy" --setting "$setting" --seed "$seed"
    done
  done
done
clbench table "$results" --output "$results/table.md"

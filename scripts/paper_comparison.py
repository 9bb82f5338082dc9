"""Side by side: what the ccgn paper reports on a scenario and what clbench results
folders measured, cell by cell (issue 14).

    python scripts/paper_comparison.py results/split_mnist_paper --reported configs/paper/split_mnist_reported.yaml

Accuracy: the average accuracy after the last task, mean ± std over the folders' runs of
each strategy and setting. MACs: executed MACs per test sample after a task (averaged
over the tasks learned) over the dense backbone's, which naive in the same setting runs.
A reported range is compared with its midpoint. Prints a Markdown table; --output also
writes it.
"""

import argparse

import numpy as np
import pandas as pd
import yaml

from clbench.results import RUN_KEYS, load_metrics


def reported_value(value) -> tuple[str, float]:
    if isinstance(value, list):
        return f"{value[0]:.2f}-{value[1]:.2f}", float(np.mean(value))
    return f"{value:.3f}", float(value)


def comparison(metrics: pd.DataFrame, reported: dict) -> pd.DataFrame:
    def measured(setting, strategy, metric, step=None):
        rows = metrics[(metrics.setting == setting) & (metrics.strategy == strategy) & (metrics.metric == metric)
                       & metrics.task.isna()]
        rows = rows[rows.step == (rows.step.max() if step is None else step)]
        if len(rows[RUN_KEYS].drop_duplicates()) > 1:
            raise SystemExit(f"error: the folders hold {strategy} in the {setting} setting under more than one "
                             "configuration; give folders that hold one")
        return rows.set_index("run_dir").value

    rows = []
    for setting, strategies in reported["average_accuracy"].items():
        for strategy, value in strategies.items():
            shown, paper = reported_value(value)
            values = measured(setting, strategy, "average_accuracy")
            rows.append((setting, strategy, "average accuracy", shown, paper, values))
    for setting, strategies in reported["macs_share_of_dense"].items():
        for strategy, per_step in strategies.items():
            for step, value in per_step.items():
                dense = measured(setting, "naive", "executed_macs", step).mean()
                values = measured(setting, strategy, "executed_macs", step) / dense
                rows.append((setting, strategy, f"MACs after task {step} / dense", f"{value:.3f}", value, values))
    return pd.DataFrame([
        {"setting": setting, "strategy": strategy, "cell": cell, "paper": shown,
         "clbench": f"{values.mean():.3f} ± {values.std():.3f}" if len(values) else "not run",
         "difference": f"{values.mean() - paper:+.3f}" if len(values) else "", "runs": len(values)}
        for setting, strategy, cell, shown, paper, values in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dirs", nargs="+",
                        help="results folders, their runs pooled (one configuration per strategy and setting)")
    parser.add_argument("--reported", required=True,
                        help="YAML file of the paper's numbers (configs/paper/*_reported.yaml)")
    parser.add_argument("--output", help="also write the Markdown table here")
    args = parser.parse_args()
    metrics, _ = load_metrics(*args.results_dirs)
    with open(args.reported) as file:
        table = comparison(metrics, yaml.safe_load(file)).to_markdown(index=False)
    print(table)
    if args.output:
        with open(args.output, "w") as file:
            file.write(table + "\n")


if __name__ == "__main__":
    main()

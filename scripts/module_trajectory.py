"""A module variant after every task (issue 13: "sparsity vs accuracy after each task"):
one row per run and variant under the results folders given, with the variant's average
accuracy over the tasks seen, its sparsity and its size after task 1, 2, ...

    python scripts/module_trajectory.py results/modules_split_mnist/ltp --variant ltp
"""

import argparse
from pathlib import Path

import pandas as pd
import yaml

from clbench.registry import load_modules


def described(entry: str | dict) -> str:
    """A module entry as its name and the options it sets away from their defaults."""
    if isinstance(entry, str):
        return entry
    defaults = load_modules()[entry["name"]].Options().model_dump()
    changed = [f"{key}={value}" for key, value in entry.items() if key != "name" and defaults.get(key) != value]
    return ":".join([entry["name"], ",".join(changed)]) if changed else entry["name"]


def trajectory(run_dir: Path, variant: str) -> dict | None:
    """The run's row, or None where it has no such variant."""
    metrics = pd.read_csv(run_dir / "metrics.csv")
    if f"average_accuracy@{variant}" not in set(metrics.metric):
        return None
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    per_step = metrics[metrics.task.isna()].pivot_table(index="step", columns="metric", values="value")
    modules = " ".join(described(entry) for entry in cfg.get("modules") or [])
    row = {"strategy": cfg["strategy"], "modules": modules, "seed": cfg["seed"]}
    for step, values in per_step.iterrows():
        row[f"accuracy {step}"] = round(values[f"average_accuracy@{variant}"], 3)
        row[f"sparsity {step}"] = round(values[f"sparsity@{variant}"], 3)
    row["Mbit after the last task"] = round(per_step[f"model_size_bits@{variant}"].iloc[-1] / 1e6, 3)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dirs", nargs="+")
    parser.add_argument("--variant", required=True, help="the module variant, e.g. ltp or w4a4_per_channel")
    args = parser.parse_args()
    runs = sorted(path.parent for folder in args.results_dirs for path in Path(folder).rglob("COMPLETED"))
    rows = [row for run in runs if (row := trajectory(run, args.variant)) is not None]
    if not rows:
        raise SystemExit(f"no finished run under {' '.join(args.results_dirs)} has the variant {args.variant!r}")
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()

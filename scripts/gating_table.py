"""Capacity left for later tasks by ccgn's gating (issue 14, point 3): one ccgn run per
row under the results folders given (e.g. sweeps/ablations/ccgn_gating.yaml's), with the final accuracy on
the first and the last task, executed MACs as a share of the dense network's, and the
share of each layer's kernels still free for the last task (`free <layer>`).

    python scripts/gating_table.py results/ablations/ccgn_gating --dense-macs 2233000

With `--mean`, the mean ± std over seeds of each configuration instead.
"""

import argparse
from pathlib import Path

import pandas as pd
import yaml

from clbench.results import recorded_config


def row(run_dir: Path, dense_macs: float) -> dict:
    cfg = recorded_config(yaml.safe_load((run_dir / "config.yaml").read_text()))  # options added since: their defaults
    accuracy = pd.read_csv(run_dir / "accuracy_matrix.csv", index_col="after_task").to_numpy()
    macs = pd.read_csv(run_dir / "executed_macs_matrix.csv", index_col="after_task").to_numpy()
    usage = pd.read_csv(run_dir / "kernel_usage.csv")
    free = usage[usage.after_task == len(accuracy) - 1].set_index("layer").free
    return {"gate_regulariser": cfg["hparams"]["gate_regulariser"],
            "closed gates learn": cfg["hparams"]["closed_gates_learn"],
            "epochs": cfg["epochs"], "sparsity": cfg["hparams"]["sparsity"],
            "firing threshold": cfg["hparams"]["firing_threshold"], "seed": cfg["seed"],
            "accuracy": accuracy[-1].mean(), "task 1": accuracy[-1, 0], f"task {len(accuracy)}": accuracy[-1, -1],
            "MACs after task 1 / dense": macs[0, 0] / dense_macs,
            f"MACs after task {len(accuracy)} / dense": macs[-1].mean() / dense_macs,
            **{f"free {layer}": share for layer, share in free.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dirs", nargs="+")
    parser.add_argument("--dense-macs", type=float, required=True, help="MACs per sample of the dense network")
    parser.add_argument("--mean", action="store_true", help="mean ± std over seeds per configuration")
    args = parser.parse_args()
    runs = sorted(path.parent for folder in args.results_dirs for path in Path(folder).rglob("COMPLETED")
                  if (path.parent / "kernel_usage.csv").exists() and "/task/ccgn/" in str(path.parent))
    keys = ["gate_regulariser", "closed gates learn", "epochs", "sparsity", "firing threshold"]
    table = pd.DataFrame([row(run, args.dense_macs) for run in runs]).sort_values([*keys, "seed"])
    if args.mean:
        grouped = table.drop(columns="seed").groupby(keys)
        mean, std = grouped.mean(), grouped.std()
        table = (mean.map("{:.3f}".format) + " ± " + std.map("{:.3f}".format)).assign(
            runs=grouped.size()).reset_index()
    print(table.round(3).to_markdown(index=False))


if __name__ == "__main__":
    main()

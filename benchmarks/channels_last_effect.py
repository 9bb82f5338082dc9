"""What running every backbone channels-last (`clbench.models.channels_last`) changes in
whole runs: wall time, and the accuracy matrices, which move only where float sums
round differently.

Each run of `CASES` (`clbench run` defaults: the embedded Split MNIST subset, 1 epoch,
seed 0) trains twice in this process, alternating: in PyTorch's default NCHW layout (the
conversion patched out) and channels-last, each into its own folder under `--work`. Per
run: both wall times, their ratio, the largest difference between the two accuracy
matrices and the average accuracy after the last task of each.

Usage: python benchmarks/channels_last_effect.py [--threads 1] [--tiny]
"""

from __future__ import annotations

import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch

from clbench.benchmarking import (benchmark_parser, layout, machine_columns, split_mnist_mini_tasks, torch_threads,
                                  write_csv)
from clbench.config import RunConfig
from clbench.runner import run

CASES = [("task", strategy, {}) for strategy in ("naive", "ewc", "lwf", "si", "agem", "hat", "ccgn")]
CASES += [("task", "packnet", {"epochs": 2}), ("task", "naive", {"modules": ["ptq"]})]
CASES += [("class", strategy, {}) for strategy in ("naive", "replay", "icarl", "hat_tc", "ccgn", "joint")]
COLUMNS = ["setting", "strategy", "modules", "nchw_s", "channels_last_s", "speedup", "max_cell_difference",
           "final_accuracy_nchw", "final_accuracy_channels_last", "machine", "cores", "torch_threads", "python",
           "torch", "avalanche", "clbench_commit"]
def timed_run(cfg: RunConfig, name: str) -> tuple[float, pd.DataFrame]:
    with layout(name):
        start = time.perf_counter()
        run_dir = run(cfg, overwrite=True).run_dir
        seconds = time.perf_counter() - start
    return seconds, pd.read_csv(run_dir / "accuracy_matrix.csv", index_col="after_task")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = benchmark_parser(__file__, __doc__, "two runs on 32 images per digit")
    parser.add_argument("--work", type=Path, help="folder for the runs [default: a temporary one]")
    args = parser.parse_args(argv)
    cases = CASES[:1] + CASES[-2:-1] if args.tiny else CASES
    scenario = split_mnist_mini_tasks(5, 32, 8) if args.tiny else "split_mnist_mini"
    rows = []
    with torch_threads(args.threads):
        machine = machine_columns()
        with tempfile.TemporaryDirectory() if args.work is None else nullcontext(args.work) as work:
            for setting, strategy, options in cases:
                measured = {}
                for name in ("nchw", "channels_last"):
                    cfg = RunConfig(scenario=scenario, strategy=strategy, setting=setting,
                                    results_dir=str(Path(work) / name), **options)
                    measured[name] = timed_run(cfg, name)
                (nchw_s, nchw_matrix), (last_s, last_matrix) = measured["nchw"], measured["channels_last"]
                rows.append({"setting": setting, "strategy": strategy, "modules": " ".join(options.get("modules", [])),
                             "nchw_s": round(nchw_s, 2), "channels_last_s": round(last_s, 2),
                             "speedup": round(nchw_s / last_s, 3),
                             "max_cell_difference": round(float((nchw_matrix - last_matrix).abs().max().max()), 4),
                             "final_accuracy_nchw": round(float(nchw_matrix.iloc[-1].mean()), 4),
                             "final_accuracy_channels_last": round(float(last_matrix.iloc[-1].mean()), 4),
                             **machine})
                print(" ".join(f"{key}={rows[-1][key]}" for key in COLUMNS[:9]), flush=True)
    write_csv(rows, COLUMNS, args.output)
    return rows


if __name__ == "__main__":
    main()

"""Wall time of a sweep with 1 and with several worker processes on this machine, and their
ratio. The sweep is a sweep file's runs, optionally cut to some strategies, settings and
seeds (the whole Split MNIST table takes hours on two cores); each measurement writes to
a fresh temporary folder, and the worker counts alternate for `--repeats` rounds.

Usage: python benchmarks/sweep_workers.py sweeps/split_mnist.yaml --strategies naive lwf --settings task --seeds 0 1
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

from clbench.config import read_yaml
from clbench.runner import resolve
from clbench.sweep import PlannedRun, available_cores, expand, run_id, run_sweep

RESULTS = Path(__file__).parent / "results" / "sweep_workers.csv"


def selected_runs(sweep_file: str, strategies, settings, seeds, results_dir: str) -> list[PlannedRun]:
    planned = []
    for cfg in expand(read_yaml(sweep_file, "sweep file")):
        if (strategies and cfg.strategy not in strategies or settings and cfg.setting not in settings
                or seeds and cfg.seed not in seeds):
            continue
        _, cfg = resolve(cfg.model_copy(update={"results_dir": results_dir}))
        planned.append(PlannedRun(run_id(cfg), cfg, "missing"))
    return planned


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_file")
    parser.add_argument("--strategies", nargs="*", default=[])
    parser.add_argument("--settings", nargs="*", default=[])
    parser.add_argument("--seeds", nargs="*", type=int, default=[])
    parser.add_argument("--workers", nargs="*", type=int, default=[1, available_cores()])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS, help="CSV to write [default: %(default)s]")
    args = parser.parse_args()
    times = {workers: [] for workers in args.workers}
    for _ in range(args.repeats):
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as folder:
                planned = selected_runs(args.sweep_file, args.strategies, args.settings, args.seeds, folder)
                start = time.perf_counter()
                failures = run_sweep(planned, workers)
                times[workers].append(time.perf_counter() - start)
                assert not failures, failures
    machine = {"machine": platform.processor() or platform.machine(), "cores": available_cores(),
               "python": platform.python_version(), "torch": torch.__version__,
               "avalanche": metadata.version("avalanche-lib"),
               "clbench_commit": os.popen("git rev-parse --short HEAD").read().strip()
               + ("+dirty" if os.popen("git status --porcelain").read().strip() else "")}
    one = min(times[args.workers[0]])
    rows = [{"sweep": args.sweep_file, "runs": len(planned), "strategies": " ".join(args.strategies) or "all",
             "settings": " ".join(args.settings) or "all", "seeds": " ".join(map(str, args.seeds)) or "all",
             "workers": workers, "threads_per_worker": max(1, available_cores() // workers),
             "best_wall_s": round(min(measured), 1), "all_wall_s": " ".join(f"{t:.1f}" for t in measured),
             "speedup_vs_first": round(one / min(measured), 2), **machine}
            for workers, measured in times.items()]
    print(f"{'workers':>7} {'threads':>7} {'best wall (s)':>13} {'speed-up':>8}")
    for row in rows:
        print(f"{row['workers']:>7} {row['threads_per_worker']:>7} {row['best_wall_s']:>13} "
              f"{row['speedup_vs_first']:>8}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()

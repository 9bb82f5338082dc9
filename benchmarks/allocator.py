"""Time, page faults and memory of clbench's memory allocation
(`clbench.allocator.keep_freed_memory`: glibc serves every block from its heap and keeps
the heap) against glibc's defaults (large blocks mapped fresh and given back when freed).

A process cannot return to glibc's defaults once changed, so each variant runs in a
process of its own, started anew every round, the variants alternating (A B A B ...,
`--rounds` rounds). Each process times, `--repeats` calls each:
- small_cnn_train: a training step of the small CNN (width 32, SGD), batch 64 as the
  Split MNIST preset;
- small_cnn_eval: its forward pass at batch 512, clbench's evaluation batch;
- resnet18_train / resnet18_eval: the same for ResNet-18 of width 16, training batch 32
  as the Split CIFAR-10 preset;
- run_naive / run_ccgn: a whole `clbench run` of naive and of ccgn, one call a round: on
  the embedded Split MNIST (the run defaults: task setting, 1 epoch, batch 32), or as
  `--run-config` says (a preset such as configs/paper/split_mnist.yaml, with
  `--run-epochs` epochs per task if given).
Every workload but the whole runs is called once before it is timed. Per workload: best
and median per call, minor page faults per call, and the process's
peak resident memory so far (the workloads run in the order above). Speed is the default
variant's best time over clbench's.

Usage: python benchmarks/allocator.py [--threads 1] [--rounds 5] [--tiny]
       python benchmarks/allocator.py --threads 1 --rounds 3 --run-config configs/paper/split_mnist.yaml --run-epochs 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

RESULTS = Path(__file__).parent / "results" / "allocator.csv"
VARIANTS = ["glibc_default", "clbench"]
COLUMNS = ["workload", "variant", "best_ms", "median_ms", "speed_vs_default", "page_faults_per_call", "peak_rss_mb",
           "rounds", "repeats", "machine", "cores", "torch_threads", "python", "torch", "avalanche", "clbench_commit"]


def workloads(tiny: bool, run_config: Path | None, run_epochs: int | None) -> dict:
    """Each workload's call, by name. clbench is imported here, not at the top, so that a
    `glibc_default` process imports it with `keep_freed_memory` patched out."""
    import torch
    import torch.nn.functional as F

    from clbench.benchmarking import split_mnist_mini_tasks
    from clbench.config import resolve_config
    from clbench.models import ResNet18, SmallCNN
    from clbench.runner import run

    small_width, resnet_width, train_batch, eval_batch, scenario = (
        (4, 4, 4, 8, split_mnist_mini_tasks(5, 8, 4)) if tiny else (32, 16, None, 512, "split_mnist_mini"))
    # The small CNN's evaluation keeps its full size when tiny (a tenth of a second a call):
    # its first activation map (51 MB) is larger than any block glibc's defaults keep.
    torch.manual_seed(0)

    def training_step(network, shape, batch):
        head = torch.nn.Linear(network.out_features, 10)
        optimizer = torch.optim.SGD([*network.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
        x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))

        def step():
            optimizer.zero_grad()
            F.cross_entropy(head(network(x)), y).backward()
            optimizer.step()
        return step

    def evaluation(network, shape, batch):
        network, x = network.eval(), torch.randn(batch, *shape)

        def forward():
            with torch.no_grad():
                network(x)
        return forward

    def whole_run(strategy):
        def call():
            with tempfile.TemporaryDirectory() as folder:
                overrides = {"strategy": strategy, "results_dir": folder, "epochs": run_epochs}
                if run_config is None:
                    overrides |= {"scenario": scenario, "width": small_width}
                run(resolve_config(run_config, overrides))
        return call

    small, resnet = (1, 28, 28), (3, 32, 32)
    return {"small_cnn_train": training_step(SmallCNN(1, small_width), small, train_batch or 64),
            "small_cnn_eval": evaluation(SmallCNN(1, 32), small, 512),
            "resnet18_train": training_step(ResNet18(3, resnet_width), resnet, train_batch or 32),
            "resnet18_eval": evaluation(ResNet18(3, resnet_width), resnet, eval_batch),
            "run_naive": whole_run("naive"), "run_ccgn": whole_run("ccgn")}


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def worker(variant: str, threads: int, repeats: int, tiny: bool, run_config: Path | None,
           run_epochs: int | None) -> dict:
    """One process's measurements: per workload, seconds per call, page faults per call and
    the peak resident memory so far (MiB)."""
    patch = mock.patch("clbench.allocator.keep_freed_memory", return_value=False)
    with patch if variant == "glibc_default" else nullcontext():
        import torch

        import clbench.benchmarking  # noqa: F401  (sets clbench's allocation unless patched)
        calls = workloads(tiny, run_config, run_epochs)
    torch.set_num_threads(threads)
    measured = {}
    for name, call in calls.items():
        whole_run = name.startswith("run_")
        if not whole_run:  # a whole run is long enough to carry its own warm-up
            call()
        times_of = 1 if whole_run else repeats
        faults, start = minor_faults(), time.perf_counter()
        for _ in range(times_of):
            call()
        measured[name] = {"seconds": (time.perf_counter() - start) / times_of,
                          "faults": (minor_faults() - faults) / times_of,
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "calls": times_of}
    return measured


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads [PyTorch's default]")
    parser.add_argument("--tiny", action="store_true", help="tiny networks and scenario (but the small CNN's evaluation), 1 round of 3 calls")
    parser.add_argument("--output", type=Path, default=RESULTS, help="CSV to write [default: %(default)s]")
    parser.add_argument("--run-config", type=Path, help="preset of the whole runs [the run defaults]")
    parser.add_argument("--run-epochs", type=int, help="epochs per task of the whole runs [the preset's]")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)  # one process's measurements
    args = parser.parse_args(argv)
    rounds, repeats = (1, 3) if args.tiny else (args.rounds, args.repeats)
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, repeats, args.tiny, args.run_config, args.run_epochs)))
        return []
    import torch

    from clbench.benchmarking import best_and_median_ms, machine_columns, machine_line, torch_threads, write_csv

    threads = args.threads or torch.get_num_threads()
    command = [sys.executable, __file__, "--threads", str(threads), "--repeats", str(repeats),
               *(["--tiny"] if args.tiny else []),
               *(["--run-config", str(args.run_config)] if args.run_config else []),
               *(["--run-epochs", str(args.run_epochs)] if args.run_epochs else [])]
    measured = {variant: [] for variant in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            done = subprocess.run([*command, "--worker", variant], capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"the {variant} process failed:\n{done.stderr.strip()}")
            measured[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    with torch_threads(threads):
        machine = machine_columns()
    rows = []
    for workload in measured["clbench"][0]:
        best = {variant: min(m[workload]["seconds"] for m in measured[variant]) for variant in VARIANTS}
        for variant in VARIANTS:
            ours = [m[workload] for m in measured[variant]]
            seconds = [m["seconds"] for m in ours]
            rows.append({"workload": workload, "variant": variant, **best_and_median_ms(seconds),
                         "speed_vs_default": round(best["glibc_default"] / best[variant], 2),
                         "page_faults_per_call": round(statistics.median(m["faults"] for m in ours)),
                         "peak_rss_mb": round(max(m["peak_rss_mb"] for m in ours)),
                         "rounds": rounds, "repeats": ours[0]["calls"], **machine})
    print(f"{'workload':<16} {'variant':<14} {'best ms':>10} {'median ms':>10} {'speed':>6} {'faults':>8} "
          f"{'peak MiB':>9}")
    for row in rows:
        print(f"{row['workload']:<16} {row['variant']:<14} {row['best_ms']:>10} {row['median_ms']:>10} "
              f"{row['speed_vs_default']:>6} {row['page_faults_per_call']:>8} {row['peak_rss_mb']:>9}")
    print(machine_line(machine))
    write_csv(rows, COLUMNS, args.output)
    return rows


if __name__ == "__main__":
    main()

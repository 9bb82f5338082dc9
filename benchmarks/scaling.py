"""Training time per task, evaluation time per step and peak memory of clbench runs as the
number of tasks grows: naive, ewc, hat (hat_tc in the class setting) and ccgn, in both
settings, on 5, 10 and 20 Split-MNIST-like tasks.

The tasks (`clbench.benchmarking.split_mnist_mini_tasks`) are the embedded MNIST subset's
digit pairs, as in Split MNIST, repeated under 1, 2 or 4 pixel permutations: every task
has two classes of its own and the same number of images (`--train-per-class`,
`--test-per-class` per digit). Each run is `clbench run`'s (`clbench.runner.run`: one
epoch, batch 32, the strategies' defaults), in a process forked for it, so that its peak
memory is its own: `resource.getrusage(RUSAGE_SELF).ru_maxrss`, the most pages it held
resident (its data, tensors and Python objects, and of the libraries the parent loaded
the parts it ran), beside its resident set when it started. The times are the runner's
own (wall clock): each task's training, and the evaluation after it of every task's
test set (the tasks not learned yet included).

Expected growth with the number of tasks T (the data per task fixed):
- Training time per task: constant for naive, ewc (online EWC keeps one importance
  estimate), hat and ccgn in the task setting. In the class setting ccgn and hat_tc
  replay a batch of the task classifier's memory through every learned path with each
  training batch: task k costs about k paths, so the mean per task grows linearly in T.
- Evaluation time per step: each step evaluates all T test sets, so it grows linearly
  in T where a sample runs one path (naive, ewc, hat, ccgn in the task setting). In the
  class setting ccgn and hat_tc run every learned path on every test sample: step k
  costs about k * T, the mean per step grows as T^2.
- Peak memory: the data grows linearly in T, and so do the per-task parameters (heads,
  ccgn's gating modules, HAT's embeddings); EWC keeps one copy of the importances and
  weights, the task classifier's memory a fixed number of images. At these sizes all
  of them are small beside Python and PyTorch (about 0.6 GB); the figures written at
  the end grow as T^2 (the accuracy heatmap), and at 20 tasks they set the peak.

Usage: python benchmarks/scaling.py --threads 1 [--tiny] [--tasks 5 10 20] [--strategies naive ewc hat ccgn]
"""

from __future__ import annotations

import multiprocessing
import resource
import tempfile

import pandas as pd
import torch

from clbench.benchmarking import benchmark_parser, machine_columns, split_mnist_mini_tasks, torch_threads, write_csv
from clbench.config import RunConfig
from clbench.runner import run

# In the class setting HAT needs ccgn's task classifier: hat_tc.
STRATEGIES = {"naive": {"task": "naive", "class": "naive"}, "ewc": {"task": "ewc", "class": "ewc"},
              "hat": {"task": "hat", "class": "hat_tc"}, "ccgn": {"task": "ccgn", "class": "ccgn"}}
COLUMNS = ["strategy", "setting", "tasks", "train_s_per_task", "train_s_first_task", "train_s_last_task",
           "eval_s_per_step", "eval_s_first_step", "eval_s_last_step", "peak_rss_mb", "start_rss_mb",
           "train_per_class", "test_per_class", "width", "machine", "cores", "torch_threads", "python", "torch",
           "avalanche", "clbench_commit"]


def measured_run(cfg: RunConfig, scenario: tuple[int, int, int], threads: int, sender) -> None:
    """Runs `cfg` on `split_mnist_mini_tasks(*scenario)` in this (forked) process and sends
    its times per task and its peak and starting resident memory (MB)."""
    torch.set_num_threads(threads)
    start_rss = resident_mb()
    outcome = run(cfg.model_copy(update={"scenario": split_mnist_mini_tasks(*scenario)}))
    metrics = pd.read_csv(outcome.run_dir / "metrics.csv")
    times = {name: metrics[metrics.metric == name].sort_values("step").value.tolist()
             for name in ("train_time_s", "eval_time_s")}
    sender.send({**times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                 "start_rss_mb": start_rss})


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def in_fresh_process(cfg: RunConfig, scenario: tuple[int, int, int], threads: int) -> dict:
    """`measured_run` in a forked process: the imports are done already, the memory is its own."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=measured_run, args=(cfg, scenario, threads, sender))
    child.start()
    sender.close()
    try:
        return receiver.recv()
    except EOFError:
        raise RuntimeError(f"the {cfg.strategy} run ({cfg.setting} setting) failed; its traceback is above") from None
    finally:
        child.join()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = benchmark_parser(__file__, __doc__, "8 / 4 images per digit, width 4")
    parser.add_argument("--tasks", type=int, nargs="+", default=[5, 10, 20], help="multiples of 5 [%(default)s]")
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--settings", nargs="+", choices=["task", "class"], default=["task", "class"])
    parser.add_argument("--train-per-class", type=int, default=64, help="training images per digit [%(default)s]")
    parser.add_argument("--test-per-class", type=int, default=20, help="test images per digit [%(default)s]")
    parser.add_argument("--width", type=int, default=RunConfig().width, help="small CNN width [%(default)s]")
    args = parser.parse_args(argv)
    train_per_class, test_per_class, width = (8, 4, 4) if args.tiny else (
        args.train_per_class, args.test_per_class, args.width)
    rows = []
    with torch_threads(args.threads):
        machine = machine_columns()
        with tempfile.TemporaryDirectory() as folder:
            for tasks in args.tasks:
                for setting in args.settings:
                    for name in args.strategies:
                        cfg = RunConfig(strategy=STRATEGIES[name][setting], setting=setting, width=width,
                                        results_dir=folder)
                        measured = in_fresh_process(cfg, (tasks, train_per_class, test_per_class), args.threads)
                        train, evaluation = measured["train_time_s"], measured["eval_time_s"]
                        rows.append({"strategy": cfg.strategy, "setting": setting, "tasks": tasks,
                                     "train_s_per_task": round(sum(train) / tasks, 3),
                                     "train_s_first_task": round(train[0], 3), "train_s_last_task": round(train[-1], 3),
                                     "eval_s_per_step": round(sum(evaluation) / tasks, 3),
                                     "eval_s_first_step": round(evaluation[0], 3),
                                     "eval_s_last_step": round(evaluation[-1], 3),
                                     "peak_rss_mb": round(measured["peak_rss_mb"]),
                                     "start_rss_mb": round(measured["start_rss_mb"]),
                                     "train_per_class": train_per_class, "test_per_class": test_per_class,
                                     "width": width, **machine})
                        print_row(rows[-1])
    write_csv(rows, COLUMNS, args.output)
    return rows


def print_row(row: dict) -> None:
    print(f"{row['strategy']:<7} {row['setting']:<5} {row['tasks']:>3} tasks: train {row['train_s_per_task']:7.2f} "
          f"s/task ({row['train_s_first_task']:.2f} first, {row['train_s_last_task']:.2f} last), eval "
          f"{row['eval_s_per_step']:7.2f} s/step ({row['eval_s_first_step']:.2f} first, {row['eval_s_last_step']:.2f} "
          f"last), peak RSS {row['peak_rss_mb']} MB (start {row['start_rss_mb']} MB)", flush=True)


if __name__ == "__main__":
    main()

"""Time per training iteration of clbench's strategies beside a bare PyTorch loop on the
same network, data, batch size and optimiser: what Avalanche's template and clbench add.

Every variant trains a fresh network, seeded alike, on the first `--tasks` tasks of the
embedded Split MNIST subset (in-memory tensors, task setting, batch 32, one epoch; 32
images per digit with `--tiny`), with the small CNN and a narrow ResNet-18:
- bare: `for x, y, t in DataLoader(TensorDataset(x, y, t), shuffle=True)`, then
  zero_grad, forward, cross-entropy, backward and an SGD step (lr 0.01, momentum 0.9);
- bare_nchw: the same with PyTorch's default (NCHW) layout instead of the channels-last
  one every clbench backbone runs in (`clbench.models.channels_last` off): what that
  layout buys;
- avalanche_naive: Avalanche's `Naive` template with its own data loader and an
  evaluator without metrics or loggers, same optimiser;
- naive, ewc, ccgn: clbench's strategies as `clbench run` builds them (registry, the
  runner's training setup with clbench's plugins and evaluator);
- naive_adam: clbench's naive with Adam at ccgn's learning rate, i.e. ccgn's network
  without its gates, trained with ccgn's optimiser.
A variant's time per iteration is its whole training (what its template does once per
task included: EWC's importances, ccgn's firing rates on held-out data) over the
iterations it ran (ccgn holds out a tenth of each task and drops the last partial batch).

The variants alternate for `--rounds` rounds after one warm-up round. Times are the
process's CPU time, which on a shared machine counts only the time the benchmark ran
(wall time is in the CSV too); best and median per variant. Speed relative to the bare
loop is its time over the variant's (1.0: as fast), and ccgn's cost over its ungated
backbone the ratio ccgn / naive_adam.

`--backbones` and `--variants` time only some (the bare loop, the ratios' reference, always
runs, and naive_adam with ccgn): a wider ResNet-18 in minutes, not hours.

With `--profile VARIANT`, instead of timing: one run of that variant after a warm-up
run, under PyTorch's profiler, and its costliest operators by self CPU time, per network
(no CSV): where a variant's time goes.

Usage: python benchmarks/train_overhead.py --threads 1 [--tiny] [--profile ccgn]
       python benchmarks/train_overhead.py --threads 1 --backbones resnet18 --resnet-width 16 --variants ccgn
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch
from avalanche.training import Naive
from avalanche.training.determinism.rng_manager import RNGManager
from clbench.datasets.scenarios import build_scenario
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clbench.benchmarking import (benchmark_parser, layout, machine_columns, positive_width, split_mnist_mini_tasks,
                                  torch_threads, write_csv)
from clbench.config import RunConfig
from clbench.models import ModelSpec, build_model
from clbench.registry import get_strategy
from clbench.runner import TrainingProgress, make_optimizer, resolve, training_setup

COLUMNS = ["backbone", "width", "variant", "iterations", "best_ms", "median_ms", "best_wall_ms", "median_wall_ms",
           "speed_vs_bare", "speed_vs_bare_median", "ccgn_vs_ungated", "ccgn_vs_ungated_median", "tasks", "batch",
           "rounds", "machine", "cores", "torch_threads", "python", "torch", "avalanche", "clbench_commit"]
CCGN_LR = get_strategy("ccgn").Hparams.model_fields["lr"].default
CLBENCH_VARIANTS = {"naive": {}, "ewc": {}, "naive_adam": {"optimizer": "adam", "lr": CCGN_LR}, "ccgn": {}}

# A training run to time: it returns the iterations it trained.
Run = Callable[[], int]


def bare_loop(spec: ModelSpec, tasks: list[tuple[torch.Tensor, ...]], batch: int) -> Run:
    model = build_model(spec)
    optimizer = make_optimizer(RunConfig(), model)
    criterion = nn.CrossEntropyLoss()

    def train() -> int:
        iterations = 0
        for x, y, t in tasks:
            for inputs, targets, task_labels in DataLoader(TensorDataset(x, y, t), batch_size=batch, shuffle=True):
                optimizer.zero_grad()
                loss = criterion(model(inputs, task_labels), targets)
                loss.backward()
                optimizer.step()
                iterations += 1
        return iterations

    return train


def nchw(train: Run) -> Run:
    """`train` with the backbones left in PyTorch's default layout."""
    def run() -> int:
        with layout("nchw"):
            return train()

    return run


def template_run(trainer, experiences) -> Run:
    def train() -> int:
        for experience in experiences:
            trainer.train(experience)
        return trainer.clock.train_iterations

    return train


def avalanche_naive(spec: ModelSpec, experiences, batch: int) -> Run:
    model = build_model(spec)
    trainer = Naive(model=model, optimizer=make_optimizer(RunConfig(), model), criterion=nn.CrossEntropyLoss(),
                    train_mb_size=batch, evaluator=None)
    return template_run(trainer, experiences)


def clbench_strategy(variant: str, spec: ModelSpec, experiences, batch: int) -> Run:
    """The strategy's template as `clbench run` builds it."""
    strategy, cfg = resolve(RunConfig(strategy=variant.removesuffix("_adam"), backbone=spec.backbone, width=spec.width,
                                      batch_size=batch, **CLBENCH_VARIANTS[variant]))
    return template_run(strategy.make_trainer(strategy.make_model(spec), training_setup(cfg, TrainingProgress(), [])),
                        experiences)


def variants(spec: ModelSpec, experiences, batch: int) -> dict[str, Callable[[], Run]]:
    """Each variant's builder of a fresh, seeded training run."""
    tasks = [next(iter(DataLoader(e.dataset.train(), batch_size=len(e.dataset)))) for e in experiences]
    builders = {"bare": lambda: bare_loop(spec, tasks, batch),
                "bare_nchw": lambda: nchw(bare_loop(spec, tasks, batch)),
                "avalanche_naive": lambda: avalanche_naive(spec, experiences, batch)}
    builders.update({name: lambda name=name: clbench_strategy(name, spec, experiences, batch)
                     for name in CLBENCH_VARIANTS})

    def seeded(build):
        RNGManager.set_random_seeds(0)
        return build()

    return {name: lambda build=build: seeded(build) for name, build in builders.items()}


def timings(builders: dict[str, Callable[[], Run]], rounds: int) -> tuple[dict, dict, dict]:
    """CPU and wall seconds per iteration of each variant, `rounds` times after a warm-up
    round, the variants interleaved; and the iterations each trained."""
    cpu, wall, iterations = ({name: [] for name in builders} for _ in range(3))
    gc.collect()
    gc.freeze()  # the scenario's many objects: a full collection would take most of a second
    try:
        for round_ in range(rounds + 1):
            for name, build in builders.items():
                train = build()
                gc.collect()  # the previous variant's garbage is not this one's
                cpu_start, wall_start = time.process_time(), time.perf_counter()
                done = train()
                if round_:
                    cpu[name].append((time.process_time() - cpu_start) / done)
                    wall[name].append((time.perf_counter() - wall_start) / done)
                iterations[name] = done
    finally:
        gc.unfreeze()
    return cpu, wall, iterations


def profile(build: Callable[[], Run]) -> str:
    """The costliest operators of one run after a warm-up run, by self CPU time."""
    build()()
    train = build()
    with torch.profiler.profile() as profiler:
        train()
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = benchmark_parser(__file__, __doc__, "narrow networks, 32 images per digit, 2 rounds", rounds=5)
    parser.add_argument("--tasks", type=int, default=2, help="tasks trained per round [%(default)s]")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resnet-width", type=positive_width, default=8,
                        help="ResNet-18's first-stage width [%(default)s]")
    names = ["bare", "bare_nchw", "avalanche_naive", *CLBENCH_VARIANTS]
    parser.add_argument("--profile", choices=names, help="profile this variant instead of timing every one (no CSV)")
    parser.add_argument("--backbones", nargs="+", choices=["small_cnn", "resnet18"], default=["small_cnn", "resnet18"])
    parser.add_argument("--variants", nargs="+", choices=names, default=names,
                        help="variants to time (bare always; naive_adam with ccgn) [all]")
    args = parser.parse_args(argv)
    rounds = 2 if args.tiny else args.rounds
    timed = {"bare", *args.variants, *(["naive_adam"] if "ccgn" in args.variants else [])}
    widths = {"small_cnn": 4 if args.tiny else RunConfig().width, "resnet18": 2 if args.tiny else args.resnet_width}
    scenario = build_scenario(split_mnist_mini_tasks(5, 32, 8) if args.tiny else "split_mnist_mini", "task")
    experiences = scenario.benchmark.train_stream[:args.tasks]
    rows = []
    with torch_threads(args.threads):
        machine = machine_columns()
        for backbone in args.backbones:
            width = widths[backbone]
            spec = ModelSpec(backbone, width, scenario.spec.input_shape, "task", scenario.task_classes)
            if args.profile:
                print(f"{backbone} (width {width}), {args.profile}:\n"
                      f"{profile(variants(spec, experiences, args.batch)[args.profile])}")
                continue
            builders = {name: build for name, build in variants(spec, experiences, args.batch).items() if name in timed}
            cpu, wall, iterations = timings(builders, rounds)
            rows += [{"backbone": backbone, "width": width, **row, "tasks": args.tasks, "batch": args.batch,
                      "rounds": rounds, **machine} for row in variant_rows(cpu, wall, iterations)]
    if rows:
        print_table(rows)
        write_csv(rows, COLUMNS, args.output)
    return rows


def variant_rows(cpu: dict, wall: dict, iterations: dict) -> list[dict]:
    """Each variant's times (ms per iteration) and ratios, from its seconds per iteration."""
    best = {name: min(times) for name, times in cpu.items()}
    median = {name: statistics.median(times) for name, times in cpu.items()}
    rows = []
    for name in cpu:
        ccgn = name == "ccgn"
        rows.append({"variant": name, "iterations": iterations[name], "best_ms": round(1e3 * best[name], 3),
                     "median_ms": round(1e3 * median[name], 3), "best_wall_ms": round(1e3 * min(wall[name]), 3),
                     "median_wall_ms": round(1e3 * statistics.median(wall[name]), 3),
                     "speed_vs_bare": round(best["bare"] / best[name], 3),
                     "speed_vs_bare_median": round(median["bare"] / median[name], 3),
                     "ccgn_vs_ungated": round(best[name] / best["naive_adam"], 3) if ccgn else None,
                     "ccgn_vs_ungated_median": round(median[name] / median["naive_adam"], 3) if ccgn else None})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'backbone':<9} {'width':>5} {'variant':<15} {'iters':>5} {'best ms':>8} {'median ms':>9} "
          f"{'speed vs bare (best/median)':>27} {'ccgn / ungated (best/median)':>28}")
    for row in rows:
        ccgn = row["variant"] == "ccgn"
        ungated = f"{row['ccgn_vs_ungated']:.2f} / {row['ccgn_vs_ungated_median']:.2f}" if ccgn else ""
        print(f"{row['backbone']:<9} {row['width']:>5} {row['variant']:<15} {row['iterations']:>5} "
              f"{row['best_ms']:>8.2f} {row['median_ms']:>9.2f} {row['speed_vs_bare']:>15.3f} / "
              f"{row['speed_vs_bare_median']:<9.3f} {ungated:>28}")
    print(f"CPU time per iteration; machine: {rows[0]['machine']}, {rows[0]['cores']} cores, "
          f"torch threads {rows[0]['torch_threads']}, torch {rows[0]['torch']}")


if __name__ == "__main__":
    main()

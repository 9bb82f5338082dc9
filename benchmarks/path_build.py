"""Time to cut ccgn's compact paths (`clbench.compact.CompactPath`) from its network. In
the class setting the task classifier trains on the learned paths' features, read
through their compact paths, which are cut again after every optimiser step (the
kernels they are cut from change version); evaluation cuts each once. On the networks
of benchmarks/gated_inference.py (`clbench.benchmarking.gated_networks`: ccgn's small
CNN trained on the embedded Split MNIST and with random gates, ResNet-18 of width 16 with
random gates; or instead, with `--runs`, the networks of finished runs whose checkpoints
were kept): every learned task's path cut on its own (`each_task`, what the class
setting's training cuts per step, or the task setting's evaluation once), and in the
class setting every learned path cut as one (`stacked`). The two alternate for
`--rounds` rounds of `--repeats` builds; best and median ms per build.

Usage: python benchmarks/path_build.py [--threads 1] [--tiny] [--runs RUN_DIR ...]
"""

from __future__ import annotations

import torch

from clbench.benchmarking import (add_network_options, benchmark_parser, best_and_median_ms, gated_networks,
                                  interleaved_times, machine_columns, machine_line, torch_threads, write_csv)
from clbench.compact import CompactPath

COLUMNS = ["backbone", "width", "gates", "trained_on", "setting", "paths", "tasks", "best_ms", "median_ms", "rounds",
           "repeats", "machine", "cores", "torch_threads", "python", "torch", "avalanche", "clbench_commit"]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = benchmark_parser(__file__, __doc__, "width 4, 2 rounds of 1 build", rounds=7, repeats=10,
                              repeats_help="builds per round")
    add_network_options(parser)
    args = parser.parse_args(argv)
    rounds, repeats = (2, 1) if args.tiny else (args.rounds, args.repeats)
    rows = []
    with torch_threads(args.threads):
        machine = machine_columns()
        for backbone, width, gates, trained_on, setting, _, model, _ in gated_networks(args, images=1):
            learned = tuple(range(model.tasks_learned))
            builds = {"each_task": lambda: [CompactPath(model, (task,)) for task in learned]}
            if setting == "class":
                builds["stacked"] = lambda: CompactPath(model, learned)
            with torch.no_grad():
                times = interleaved_times(builds, rounds, repeats)
            for name, measured in times.items():
                rows.append({"backbone": backbone, "width": width, "gates": gates, "trained_on": trained_on,
                             "setting": setting, "paths": name, "tasks": len(learned), **best_and_median_ms(measured),
                             "rounds": rounds, "repeats": repeats, **machine})
    for row in rows:
        print(f"{row['backbone']:<9} {row['width']:>2} {row['gates']:<7} {row['setting']:<5} {row['paths']:<9} "
              f"{row['tasks']} tasks {row['best_ms']:>8.3f} ms best {row['median_ms']:>8.3f} median")
    print(machine_line(machine))
    write_csv(rows, COLUMNS, args.output)
    return rows


if __name__ == "__main__":
    main()

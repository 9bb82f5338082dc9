"""How ccgn's compact paths should run a batch of each size: the batch sizes from which
they compute each sample's open channels (the backbone's `per_sample_from_batch`) and up to
which the class setting runs every learned task's path as one (`TaskPathNet.stacked_path`:
`stacked_layer_macs`, beside the MACs per sample the paths run as one compute beyond
running each alone, column `extra_macs`). The networks of benchmarks/gated_inference.py
(`clbench.benchmarking.gated_networks`: ccgn's small CNN trained on the embedded Split MNIST
and with random gates, ResNet-18 of width 16 with random gates; or instead, with `--runs`,
the networks of finished runs whose checkpoints were kept), both settings, at each of
`--batches`: one set of channels for the batch, the kept ones (`kept`); each sample's own
(`per_sample`); in the class setting the paths run as one (`stacked`); what clbench's
defaults pick (`clbench`); and what the issue asks the gated network to beat, the dense
backbone (task setting: `dense`; class setting: once per learned task,
`dense_every_path`). The executions alternate for `--rounds` rounds of `--repeats` passes
at a batch of 64 or more, 64 / batch times as many at smaller batches (column `repeats`), so
that the best time of a pass of a millisecond is as sure as that of a pass of 50; best and
median per pass, and the dense execution's best time over each one's. The gated
executions must give the same outputs (within float tolerance) and MACs, or the script
stops.

Usage: python benchmarks/batch_thresholds.py [--threads 1] [--tiny] [--runs RUN_DIR ...]
"""

from __future__ import annotations

import math

import torch

from clbench.benchmarking import (add_network_options, benchmark_parser, best_and_median_ms, gated_networks,
                                  interleaved_times, machine_columns, machine_line, torch_threads, write_csv)
from clbench.models import build_model
from clbench.path_network import TaskPathNet

COLUMNS = ["backbone", "width", "gates", "trained_on", "setting", "batch", "execution", "best_ms", "median_ms",
           "speedup_over_dense", "extra_macs", "rounds", "repeats", "machine", "cores", "torch_threads", "python",
           "torch", "avalanche", "clbench_commit"]
DEFAULTS = {name: getattr(TaskPathNet, name)
            for name in ("per_sample_channels", "stacked_paths_max_batch", "stacked_layer_macs")}


def executions(model, dense, setting: str, x: torch.Tensor, t: torch.Tensor) -> dict:
    def gated(per_sample_from_batch: int | None, **settings):
        """clbench's defaults but for `settings`, with the backbone computing each sample's
        channels from `per_sample_from_batch` (None: never)."""
        def run():
            model.backbone.per_sample_from_batch = per_sample_from_batch
            for name, value in {**DEFAULTS, **settings}.items():
                setattr(model, name, value)
            return model.forward_with_macs(x, t)
        return run

    runs = {"kept": gated(None, stacked_paths_max_batch=0), "per_sample": gated(1, stacked_paths_max_batch=0),
            "clbench": gated(type(model.backbone).per_sample_from_batch)}
    if setting == "task":
        return {**runs, "dense": lambda: dense(x, t)}
    return {**runs, "stacked": gated(None, stacked_paths_max_batch=len(x), stacked_layer_macs=math.inf),
            "dense_every_path": lambda: [dense(x) for _ in range(model.tasks_learned)]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = benchmark_parser(__file__, __doc__, "width 4, 2 rounds of 1 pass", rounds=5, repeats=3,
                              repeats_help="passes per round at a batch of 64")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    add_network_options(parser)
    args = parser.parse_args(argv)
    rounds, repeats = (2, 1) if args.tiny else (args.rounds, args.repeats)
    rows = []
    with torch_threads(args.threads):
        machine = machine_columns()
        networks = gated_networks(args, max(args.batches))
        for backbone, width, gates, trained_on, setting, spec, model, images in networks:
            dense = build_model(spec).eval()
            with torch.no_grad():
                extra_macs = "" if setting == "task" else \
                    model.compact_paths([tuple(range(model.tasks_learned))])[0].extra_macs
                for batch in args.batches:
                    x, t = images[:batch], torch.zeros(batch, dtype=torch.long)
                    runs = executions(model, dense, setting, x, t)
                    (reference, reference_macs), *others = [run() for name, run in runs.items() if "dense" not in name]
                    if not all(torch.allclose(out, reference, atol=1e-4) and torch.equal(macs, reference_macs)
                               for out, macs in others):
                        raise SystemExit(f"{backbone} {gates} {setting} batch {batch}: "
                                         "the compact executions computed different things")
                    passes = repeats * max(1, 64 // batch)
                    times = interleaved_times(runs, rounds, passes)
                    fastest_dense = min(next(measured for name, measured in times.items() if "dense" in name))
                    for name, measured in times.items():
                        rows.append({"backbone": backbone, "width": width, "gates": gates, "trained_on": trained_on,
                                     "setting": setting, "batch": batch, "execution": name,
                                     **best_and_median_ms(measured),
                                     "speedup_over_dense": round(fastest_dense / min(measured), 2),
                                     "extra_macs": extra_macs, "rounds": rounds, "repeats": passes, **machine})
    for row in rows:
        print(f"{row['backbone']:<9} {row['width']:>2} {row['gates']:<7} {row['setting']:<5} batch {row['batch']:>3} "
              f"{row['execution']:<16} {row['best_ms']:>9.3f} ms best {row['median_ms']:>9.3f} median  "
              f"{row['speedup_over_dense']:.2f}x over dense")
    print(machine_line(machine))
    write_csv(rows, COLUMNS, args.output)
    return rows


if __name__ == "__main__":
    main()

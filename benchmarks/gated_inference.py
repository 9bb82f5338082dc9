"""Inference time of ccgn's gated network executed five ways: the dense backbone it is
built on; the masked layers (every channel computed, then multiplied by its gate); the
compact paths of `clbench.compact` computing one set of channels for the whole batch (only
the kernels a task may open, padded with closed ones to a multiple of `CHANNEL_MULTIPLE`:
`compact`; without the padding: `compact_unpadded`); and the compact paths computing each
sample's open channels only (`per_sample`; clbench's default at test from a batch of 2,
timed here at a batch of 1 too). Task setting (a batch of one task, through its path) and
class setting (every learned task's path and the task classifier), batch 1 and 64, small
CNN (Split MNIST's input) and ResNet-18 (CIFAR's input) of reduced width (16; the papers'
with `--resnet-width 64`). In the class setting also every learned task's compact path run
as one on the batch repeated once per task (`stacked`; clbench's default there up to
`TaskPathNet.stacked_paths_max_batch` where `TaskPathNet.stacked_path` finds it cheaper, timed
here at a batch of 64 too), and the dense backbone run
once per learned task (`dense_every_path`), what running every path densely would cost.
In the task setting also the dense backbone narrowed to each width whose MACs per sample
do not exceed what the gated network executes (`dense_width_N`, N its width): no gates,
every sample alike, PyTorch's dense kernels. Two of them are kept: the fastest (width 1 on
every network timed so far: about the least a pass of the backbone costs on this machine
whatever it computes) and the widest, whose MACs are closest to the gated network's: a
speed-up an execution of those MACs is unlikely to pass with these kernels.

Two kinds of gates (column `gates`). `trained`: the small CNN as ccgn learns it, trained
by `clbench run` on the embedded Split MNIST (`--trained-on`, 1 epoch per task, seed 0,
in each setting), timed on that scenario's test images of the first task; or instead, with
`--runs`, the networks of finished runs whose checkpoints were kept (`clbench run ...
--keep-checkpoints`: a ResNet-18 trained on a GPU, say), timed on their scenario's test
images of the first task (column `trained_on`: scenario and epochs per task). `random`: no
training, so ResNet-18 fits on a CPU: 5 tasks learned by hand, each allowed a random 25%
(`--allowed`, column `allowed`) of every layer's kernels, with untrained gating modules
that open about half of those per sample (their batch norms, like the backbone's, hold
the statistics of random inputs), timed on random inputs. The executions alternate (dense, masked, compact, ...)
for `--rounds` rounds of `--repeats` batches each; the best and the median time per
batch are reported, and the speed-up over the dense backbone measured (best times)
beside two that MAC counts promise: by the MACs clbench counts per sample (the channels
each sample's gates open), and by the MACs of every channel the task keeps open (what an
execution giving all samples of a batch one set of channels computes at least); and how
many distinct gate patterns the batch's samples have in each layer of the first task's
path (column `gate_patterns`, layers separated by /), and in each such layer how many
channels some sample of the batch opens against how many the task keeps (column
`batch_open_channels`): where these are equal, running a batch on the channels its samples
open saves nothing over the compact path.

With `--profile EXECUTION`, instead of timing: `--repeats` passes of that execution on
each network and batch under PyTorch's profiler, and their costliest operators by self
CPU time, with their input shapes (no CSV): where a pass's time goes.

Usage: python benchmarks/gated_inference.py [--threads 1] [--tiny] [--trained-on SCENARIO] [--resnet-width 16]
                                           [--allowed 0.25]
       python benchmarks/gated_inference.py [--threads 1] --runs RUN_DIR ...
       python benchmarks/gated_inference.py --threads 1 --runs RUN_DIR --profile per_sample
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Callable
from unittest import mock

import torch

from clbench import compact
from clbench.benchmarking import (RANDOM_GATED_ALLOWED, add_network_options, benchmark_parser, best_and_median_ms,
                                  gated_networks, interleaved_times, machine_columns, machine_line, share,
                                  torch_threads, write_csv)
from clbench.models import ModelSpec, build_model
from clbench.path_network import TaskPathNet
from clbench.runner import dense_macs

COLUMNS = ["backbone", "width", "gates", "trained_on", "allowed", "setting", "batch", "execution", "best_ms",
           "median_ms", "macs_per_sample", "speedup_measured", "speedup_macs", "kept_macs_per_sample",
           "speedup_kept_macs", "gate_patterns", "batch_open_channels",
           "rounds", "repeats", "machine", "cores", "torch_threads", "python",
           "torch", "avalanche", "clbench_commit"]
NARROWED = "dense_width_"  # + the width: the narrowed dense backbones' execution names


def compact_layers(model: TaskPathNet) -> list:
    """Every `CompactLayer` of the model's compact paths cut so far."""
    return [layer for path in model._compact_paths.values() for layer in path.backbone.layers]


def kept_macs(gated: TaskPathNet, x: torch.Tensor, t: torch.Tensor) -> float:
    """MACs per sample with every channel the tasks keep open: the least that an execution
    which gives the samples of a batch one set of channels per task can compute."""
    model = copy.deepcopy(gated)
    model.forward_with_macs(x, t)  # cut the paths
    for layer in compact_layers(model):
        layer.mask = lambda x, n=layer.conv.out_channels: x.new_ones(len(x), n)
    return model.forward_with_macs(x, t)[1].float().mean().item()


def gate_usage(gated: TaskPathNet, x: torch.Tensor) -> tuple[str, str]:
    """In each layer of task 0's path: how many distinct gate patterns the samples of `x`
    have, and "open of kept": how many channels some sample opens, of those the task keeps."""
    _, trace = gated.forward_path(x, 0)
    patterns = "/".join(str(len(torch.unique(mask, dim=0))) for mask in trace.masks)
    channels = "/".join(f"{int((mask > 0.5).any(0).sum())} of {int(layer.kept_channels(0).sum())}"
                        for layer, mask in zip(gated.path_layers, trace.masks))
    return patterns, channels


def executions(spec: ModelSpec, gated: TaskPathNet, x: torch.Tensor, t: torch.Tensor) -> tuple[dict, dict]:
    """The ways to run a batch, and the MACs per sample clbench counts for each."""
    dense = build_model(spec).eval()
    gated.stacked_paths_max_batch = 0  # each path on its own, at every batch size
    unpadded, per_sample, stacked = copy.deepcopy(gated), copy.deepcopy(gated), copy.deepcopy(gated)
    unpadded.per_sample_channels = False
    per_sample.backbone.per_sample_from_batch = 1  # at every batch, where clbench computes the kept channels
    # at every batch size, whatever MACs the paths as one compute beyond separate ones
    stacked.stacked_paths_max_batch, stacked.stacked_layer_macs = len(x), math.inf
    with mock.patch.object(compact, "CHANNEL_MULTIPLE", 1):
        unpadded.forward_with_macs(x, t)  # cut, and kept until the model changes, which it does not here

    def without(attribute: str):
        def run():
            setattr(gated, attribute, False)
            gated.forward_with_macs(x, t)
            setattr(gated, attribute, True)
        return run

    runs = {"dense": lambda: dense(x, t) if spec.setting == "task" else dense(x),
            "masked": without("compact_inference"), "compact": without("per_sample_channels"),
            "compact_unpadded": lambda: unpadded.forward_with_macs(x, t),
            "per_sample": lambda: per_sample.forward_with_macs(x, t)}
    executed = gated.forward_with_macs(x, t)[1].float().mean().item()
    macs = {"dense": dense_macs(dense, x[:1], t[:1]), **{name: executed for name in runs if name != "dense"}}
    if spec.setting == "class":  # what the gated network must beat there: every learned path run densely
        runs["stacked"] = lambda: stacked.forward_with_macs(x, t)
        macs["stacked"] = executed
        runs["dense_every_path"] = lambda: [dense(x) for _ in range(gated.tasks_learned)]
        macs["dense_every_path"] = gated.tasks_learned * macs["dense"]
    else:
        for width in range(1, spec.width):
            narrow = build_model(replace(spec, width=width)).eval()
            narrow_macs = dense_macs(narrow, x[:1], t[:1])
            if narrow_macs > executed:
                break
            runs[f"{NARROWED}{width}"] = lambda narrow=narrow: narrow(x, t)
            macs[f"{NARROWED}{width}"] = narrow_macs
    return runs, macs


def fastest_and_widest_narrow(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """`times` with only the fastest (best time) and the widest of the narrowed dense backbones."""
    narrow = sorted((name for name in times if name.startswith(NARROWED)),
                    key=lambda name: int(name.removeprefix(NARROWED)))
    dropped = set(narrow[:-1]) - {min(narrow, key=lambda name: min(times[name]), default=None)}
    return {name: measured for name, measured in times.items() if name not in dropped}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = benchmark_parser(__file__, __doc__, "narrow networks, 2 rounds of 1 batch", rounds=7, repeats=5,
                              repeats_help="batches per round and execution")
    parser.add_argument("--profile", choices=["dense", "masked", "compact", "compact_unpadded", "per_sample", "stacked",
                                              "dense_every_path"],
                        help="profile this execution instead of timing every one (no CSV)")
    parser.add_argument("--allowed", type=share, default=RANDOM_GATED_ALLOWED,
                        help="share of every layer's kernels each task of the random-gate networks keeps [%(default)s]")
    add_network_options(parser)
    args = parser.parse_args(argv)
    rounds, repeats = (2, 1) if args.tiny else (args.rounds, args.repeats)
    rows = []
    with torch_threads(args.threads):
        machine = machine_columns()
        networks = gated_networks(args, allowed=args.allowed)
        for backbone, width, gates, trained_on, setting, spec, gated, images in networks:
            for batch in (1, 64):
                x, t = images[:batch], torch.zeros(batch, dtype=torch.long)
                with torch.no_grad():
                    runs, macs = executions(spec, gated, x, t)
                    for execute in runs.values():  # warm up (and cut the compact paths)
                        execute()
                    if args.profile:
                        if args.profile in runs:
                            print(f"{backbone} ({width}), {gates} gates, {setting} setting, batch {batch}, "
                                  f"{args.profile}:\n{profile(runs[args.profile], repeats)}")
                        continue
                    kept, (patterns, channels) = kept_macs(gated, x, t), gate_usage(gated, x)
                    times = fastest_and_widest_narrow(interleaved_times(runs, rounds, repeats))
                for name, measured in times.items():
                    rows.append({"backbone": backbone, "width": width, "gates": gates, "trained_on": trained_on,
                                 "allowed": args.allowed if gates == "random" else "",
                                 "setting": setting, "batch": batch, "execution": name, **best_and_median_ms(measured),
                                 "macs_per_sample": round(macs[name]),
                                 "speedup_measured": round(min(times["dense"]) / min(measured), 2),
                                 "speedup_macs": round(macs["dense"] / macs[name], 2),
                                 "kept_macs_per_sample": round(kept), "speedup_kept_macs": round(macs["dense"] / kept, 2),
                                 "gate_patterns": patterns, "batch_open_channels": channels,
                                 "rounds": rounds, "repeats": repeats, **machine})
    if not args.profile:
        print_table(rows)
        write_csv(rows, COLUMNS, args.output)
    return rows


def profile(execute: Callable[[], object], passes: int) -> str:
    """The costliest operators of `passes` passes, by self CPU time, with input shapes."""
    with torch.profiler.profile(record_shapes=True) as profiler:
        for _ in range(passes):
            execute()
    return profiler.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20,
                                                                  max_name_column_width=40)


def print_table(rows: list[dict]) -> None:
    print(f"{'backbone':<9} {'width':>5} {'gates':<7} {'setting':<7} {'batch':>5} {'execution':<16} {'best ms':>9} "
          f"{'median ms':>9} {'MACs/sample':>12} {'speed-up measured':>17} {'by MACs':>8} {'by kept MACs':>12}")
    for row in rows:
        print(f"{row['backbone']:<9} {row['width']:>5} {row['gates']:<7} {row['setting']:<7} {row['batch']:>5} "
              f"{row['execution']:<16} {row['best_ms']:>9.3f} {row['median_ms']:>9.3f} {row['macs_per_sample']:>12} "
              f"{row['speedup_measured']:>17.2f} {row['speedup_macs']:>8.2f} {row['speedup_kept_macs']:>12.2f}")
    print(machine_line(rows[0]))


if __name__ == "__main__":
    main()

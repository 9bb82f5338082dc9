"""Where computing each sample's channels pays: the threshold
`clbench.compact.PER_SAMPLE_MIN_POSITIONS`, the output positions below which a layer of a
compact path computes every kept channel for the whole batch and takes each sample's,
instead of gathering each sample's weights for a convolution grouped by sample. ccgn's
ResNet-18 with random gates (`clbench.benchmarking.random_gated_model`: 5 tasks, each
allowed a share `--allowed` of every layer's kernels, about half of those open per sample)
at each of `--widths`, task setting, batch 64, random inputs: the compact path computing
one set of channels for the batch (`compact`) against per-sample channels with the
threshold at each of `--thresholds`, alternating for `--rounds` rounds of `--repeats`
passes; best and median per pass, and the compact path's best time over each one's. All
must give the same outputs (within float tolerance) and MACs, or the script stops.

Usage: python benchmarks/per_sample_positions.py [--threads 1] [--tiny]
"""

from __future__ import annotations

from itertools import product
from unittest import mock

import torch

from clbench import compact
from clbench.benchmarking import (benchmark_parser, best_and_median_ms, gated_network, interleaved_times,
                                  machine_columns, machine_line, torch_threads, write_csv)

COLUMNS = ["backbone", "width", "allowed", "batch", "execution", "threshold", "best_ms", "median_ms",
           "speedup_over_compact", "rounds", "repeats", "machine", "cores", "torch_threads", "python", "torch",
           "avalanche", "clbench_commit"]


def executions(model, x: torch.Tensor, t: torch.Tensor, thresholds: list[int]) -> dict:
    def compact_path():
        model.per_sample_channels = False
        return model.forward_with_macs(x, t)

    def per_sample(threshold: int):
        def run():
            model.per_sample_channels, model.backbone.per_sample_from_batch = True, 1  # which ResNet-18 never does
            with mock.patch.object(compact, "PER_SAMPLE_MIN_POSITIONS", threshold):
                return model.forward_with_macs(x, t)
        return run

    return {"compact": compact_path, **{threshold: per_sample(threshold) for threshold in thresholds}}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = benchmark_parser(__file__, __doc__, "width 4, batch 8, 2 rounds", rounds=5, repeats=1)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--allowed", type=float, nargs="+", default=[0.25, 0.75])
    parser.add_argument("--thresholds", type=int, nargs="+", default=[0, 100, 300, 1000])
    args = parser.parse_args(argv)
    widths, batch, rounds = ([4], 8, 2) if args.tiny else (args.widths, 64, args.rounds)
    rows = []
    with torch_threads(args.threads), torch.no_grad():
        machine = machine_columns()
        for width, allowed in product(widths, args.allowed):
            _, model, images = gated_network("resnet18", width, "random", "task", allowed=allowed)
            x, t = images[:batch], torch.zeros(batch, dtype=torch.long)
            runs = executions(model, x, t, args.thresholds)
            (reference, reference_macs), *others = [run() for run in runs.values()]
            for out, macs in others:
                if not (torch.allclose(out, reference, atol=1e-4) and torch.equal(macs, reference_macs)):
                    raise SystemExit(f"width {width}, allowed {allowed}: per-sample channels computed something else")
            times = interleaved_times(runs, rounds, args.repeats)
            for name, measured in times.items():
                rows.append({"backbone": "resnet18", "width": width, "allowed": allowed, "batch": batch,
                             "execution": "compact" if name == "compact" else "per_sample",
                             "threshold": "" if name == "compact" else name, **best_and_median_ms(measured),
                             "speedup_over_compact": round(min(times["compact"]) / min(measured), 2),
                             "rounds": rounds, "repeats": args.repeats, **machine})
    for row in rows:
        print(f"width {row['width']:>3} allowed {row['allowed']:<5} {row['execution']:<10} {row['threshold']!s:>5} "
              f"{row['best_ms']:>9.2f} ms best {row['median_ms']:>9.2f} median  {row['speedup_over_compact']:.2f}x")
    print(machine_line(machine))
    write_csv(rows, COLUMNS, args.output)
    return rows


if __name__ == "__main__":
    main()

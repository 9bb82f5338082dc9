"""Time of a channels-last 3x3 convolution and of a 2x2 max-pooling by the number of
output channels, batch 64: why `clbench.compact` pads its convolutions' outputs to a
multiple of `CHANNEL_MULTIPLE` (8) channels. Cases are the compact paths' shapes: the
small CNN's first layer (1 input channel, 28 x 28) and second (27 and 32 inputs, 14 x
14), a narrow ResNet-18's first stage (5 inputs, 32 x 32), and the max-pooling after the
small CNN's first layer (28 x 28); and the convolution as `clbench.compact.SampleChannels`
runs the small CNN's second layer, one group per sample of n channels in and n out
(`grouped_conv`, 14 x 14): with n = 32 the dense layer's MACs. Each shape is timed alternately with every channel count,
`--rounds` rounds of `--repeats` calls; best and median per call.

Usage: python benchmarks/channel_counts.py [--threads 1] [--tiny]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clbench.benchmarking import (benchmark_parser, best_and_median_ms, interleaved_times, machine_columns,
                                  machine_line, torch_threads, write_csv)

COLUMNS = ["operation", "in_channels", "size", "out_channels", "best_ms", "median_ms", "rounds", "repeats", "machine",
           "cores", "torch_threads", "python", "torch", "avalanche", "clbench_commit"]
SHAPES = [("conv", 1, 28), ("conv", 27, 14), ("conv", 32, 14), ("conv", 5, 32), ("max_pool", None, 28),
          ("grouped_conv", None, 14)]
OUT_CHANNELS = [5, 8, 16, 20, 24, 25, 27, 31, 32]


def operation(kind: str, in_channels: int | None, size: int, out_channels: int, batch: int):
    """The operation on a random channels-last batch, as a function of nothing."""
    if kind == "max_pool":
        x = torch.randn(batch, out_channels, size, size).to(memory_format=torch.channels_last)
        return lambda: F.max_pool2d(x, 2)
    if kind == "grouped_conv":
        x = torch.randn(1, batch * out_channels, size, size).to(memory_format=torch.channels_last)
        weight = torch.randn(batch * out_channels, out_channels, 3, 3)
        return lambda: F.conv2d(x, weight, padding=1, groups=batch)
    x = torch.randn(batch, in_channels, size, size).to(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, in_channels, 3, 3)
    return lambda: F.conv2d(x, weight, padding=1)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = benchmark_parser(__file__, __doc__, "batch 2, 2 rounds of 1 call", rounds=7, repeats=5)
    args = parser.parse_args(argv)
    rounds, repeats, batch = (2, 1, 2) if args.tiny else (args.rounds, args.repeats, 64)
    rows = []
    with torch_threads(args.threads), torch.no_grad():
        machine = machine_columns()
        for kind, in_channels, size in SHAPES:
            calls = {n: operation(kind, in_channels, size, n, batch) for n in OUT_CHANNELS}
            times = interleaved_times(calls, rounds, repeats)
            for n, measured in times.items():
                rows.append({"operation": kind, "in_channels": in_channels, "size": size, "out_channels": n,
                             **best_and_median_ms(measured),
                             "rounds": rounds, "repeats": repeats, **machine})
    for row in rows:
        print(f"{row['operation']:<8} in {row['in_channels'] or '':>3} {row['size']:>2}x{row['size']:<2} "
              f"out {row['out_channels']:>2}: {row['best_ms']:7.3f} ms best, {row['median_ms']:7.3f} median")
    print(machine_line(machine))
    write_csv(rows, COLUMNS, args.output)
    return rows


if __name__ == "__main__":
    main()

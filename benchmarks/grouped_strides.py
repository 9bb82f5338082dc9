"""Why `clbench.compact` adds a zero channel to each sample's channels before a grouped
convolution whose input positions lie a multiple of `ALIASED_STRIDE_BYTES` apart: the
convolution `clbench.compact.SampleChannels` runs (one group per sample, 3x3, channels-last)
with `--out-channels` outputs per group, at each of `--batches` groups, `--sizes` and input
channels per group `--channels`, as it is (`as_is`) and after `clbench.compact.with_zero_channel`,
the copy included (`zero_channel`), alternating for `--rounds` rounds of `--repeats` calls;
best and median per call, the stride between positions in bytes and whether clbench adds
the channel there (`aliased`), and the time as it is over the time with the channel.

Usage: python benchmarks/grouped_strides.py [--threads 1] [--tiny]
"""

from __future__ import annotations

from itertools import product

import torch
import torch.nn.functional as F

from clbench.benchmarking import (benchmark_parser, best_and_median_ms, interleaved_times, machine_columns,
                                  machine_line, torch_threads, write_csv)
from clbench.compact import aliased, with_zero_channel

COLUMNS = ["batch", "size", "in_channels", "out_channels", "stride_bytes", "aliased", "execution", "best_ms",
           "median_ms", "as_is_over_zero_channel", "rounds", "repeats", "machine", "cores", "torch_threads", "python",
           "torch", "avalanche", "clbench_commit"]


def executions(values: torch.Tensor, batch: int, out_channels: int) -> dict:
    weight = torch.randn(batch * out_channels, values.shape[1] // batch, 3, 3)
    padded_weight = F.pad(weight, (0, 0, 0, 0, 0, 1))
    return {"as_is": lambda: F.conv2d(values, weight, padding=1, groups=batch),
            "zero_channel": lambda: F.conv2d(with_zero_channel(values, batch), padded_weight, padding=1,
                                             groups=batch)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = benchmark_parser(__file__, __doc__, "batch 4, 8 x 8, 2 and 4 channels, 2 rounds of 1 call",
                              rounds=3, repeats=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 28, 16, 14])
    parser.add_argument("--channels", type=int, nargs="+", default=list(range(2, 41)))
    parser.add_argument("--out-channels", type=int, default=12)
    args = parser.parse_args(argv)
    batches, sizes, channels, rounds, repeats = (([4], [8], [2, 4], 2, 1) if args.tiny else
                                                 (args.batches, args.sizes, args.channels, args.rounds, args.repeats))
    rows = []
    with torch_threads(args.threads), torch.no_grad():
        machine = machine_columns()
        for batch, size, in_channels in product(batches, sizes, channels):
            values = torch.randn(1, batch * in_channels, size, size).to(memory_format=torch.channels_last)
            times = interleaved_times(executions(values, batch, args.out_channels), rounds, repeats)
            stride = batch * in_channels * values.element_size()
            for name, measured in times.items():
                rows.append({"batch": batch, "size": size, "in_channels": in_channels,
                             "out_channels": args.out_channels, "stride_bytes": stride,
                             "aliased": aliased(values), "execution": name,
                             **best_and_median_ms(measured),
                             "as_is_over_zero_channel": round(min(times["as_is"]) / min(times["zero_channel"]), 2),
                             "rounds": rounds, "repeats": repeats, **machine})
    for row in rows[::2]:
        print(f"batch {row['batch']:>3} {row['size']:>2}x{row['size']:<2} in {row['in_channels']:>2} "
              f"stride {row['stride_bytes']:>6} B{' aliased' if row['aliased'] else '        '}: "
              f"{row['best_ms']:8.3f} ms as is, {row['as_is_over_zero_channel']:.2f}x the time with a zero channel")
    print(machine_line(machine))
    write_csv(rows, COLUMNS, args.output)
    return rows


if __name__ == "__main__":
    main()

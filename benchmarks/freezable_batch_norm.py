"""Training step (forward and backward) of ccgn's batch norm once some channels are frozen:
clbench's `FreezableBatchNorm2d` (one batch norm with batch statistics, zero weight on the
frozen channels, plus their evaluation-mode scaling in one multiply-add), with the frozen
channels' weight and bias learning (`clbench`, HAT's) and without (`constant_frozen`,
`frozen_channels_learn` off, ccgn's), against two hand-written alternatives: PyTorch's
batch norm run twice, with batch and with stored statistics, then a selection per channel
(`two_batch_norms`, clbench's until session 17); and one normalisation that picks the
statistics per channel first and applies them in one fused multiply-add (`single_pass`).
Shapes are those of the ResNet-18 of width 16 at batch 32 (channels-last), with a share
of the channels frozen. Each is checked to compute the same outputs, input gradients and
running statistics as clbench's (largest differences in the table); `--rounds` rounds
alternate them, `--repeats` calls each; best and median per call. Then (`scope`
"ccgn_step") each variant in place of clbench's inside a whole training step of ccgn's
ResNet-18 of width 16 (forward through task 1's path, cross-entropy, backward, Adam
step, batch 32) after task 0 froze half of every layer's kernels, so that every batch
norm has frozen channels.

Usage: python benchmarks/freezable_batch_norm.py [--threads 1] [--tiny]
"""

from __future__ import annotations

import copy
from functools import partial
from unittest import mock

import torch
import torch.nn.functional as F

from clbench.benchmarking import (benchmark_parser, best_and_median_ms, interleaved_times, machine_columns,
                                  machine_line, torch_threads, write_csv)
from clbench.models import ModelSpec
from clbench.path_network import FreezableBatchNorm2d
from clbench.registry import get_strategy

DIFFERENCES = ["max_output_difference", "max_gradient_difference", "max_statistics_difference"]  # from clbench's
COLUMNS = ["scope", "channels", "size", "frozen_share", "variant", "best_ms", "median_ms", "ratio_to_clbench_best",
           *DIFFERENCES, "rounds", "repeats", "machine", "cores", "torch_threads", "python", "torch", "avalanche", "clbench_commit"]
SHAPES = [(16, 32), (32, 16), (64, 8), (128, 4)]  # channels, spatial size: the four stages
FROZEN_SHARES = [0.25, 0.5, 0.75]


def two_batch_norms(norm: FreezableBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """`norm`'s training forward as two batch norms, one per kind of channel, selected."""
    mean, var = norm.running_mean.clone(), norm.running_var.clone()
    trained = F.batch_norm(x, mean, var, norm.weight, norm.bias, True, norm.momentum, norm.eps)
    kept = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
    norm.running_mean = torch.where(norm.frozen, norm.running_mean, mean)
    norm.running_var = torch.where(norm.frozen, norm.running_var, var)
    return torch.where(norm.frozen[None, :, None, None], kept, trained)


def single_pass(norm: FreezableBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """`norm`'s training forward with each channel's statistics chosen before normalising."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    frozen = norm.frozen
    scale = norm.weight * torch.rsqrt(torch.where(frozen, norm.running_var, var) + norm.eps)
    shift = norm.bias - torch.where(frozen, norm.running_mean, mean) * scale
    with torch.no_grad():
        count = x.numel() / x.shape[1]
        momentum = norm.momentum
        norm.running_mean = torch.where(frozen, norm.running_mean, torch.lerp(norm.running_mean, mean, momentum))
        norm.running_var = torch.where(frozen, norm.running_var,
                                       torch.lerp(norm.running_var, var * count / (count - 1), momentum))
    return torch.addcmul(shift[None, :, None, None], x, scale[None, :, None, None])


def clbench_forward(frozen_channels_learn: bool):
    forward = FreezableBatchNorm2d.forward  # clbench's, not the one a step patches in

    def run(norm: FreezableBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        norm.frozen_channels_learn = frozen_channels_learn
        return forward(norm, x)

    return run


# Each a training forward of a FreezableBatchNorm2d, given the norm and its input.
VARIANTS = {"clbench": clbench_forward(True), "constant_frozen": clbench_forward(False),
            "two_batch_norms": two_batch_norms, "single_pass": single_pass}


def step(forward, x: torch.Tensor, gradient: torch.Tensor):
    """One forward and backward; the output and the input's gradient."""
    out = forward(x)
    (grad,) = torch.autograd.grad(out, x, gradient)
    return out, grad


def ccgn_steps(variants: dict, width: int, batch: int) -> dict:
    """A training step of ccgn's ResNet-18 with each of `variants` as
    `FreezableBatchNorm2d`'s training forward."""
    torch.manual_seed(0)
    spec = ModelSpec("resnet18", width, (3, 32, 32), "task", [[0, 1], [2, 3]])
    model = get_strategy("ccgn").from_hparams({}).make_model(spec).train()
    for layer in model.path_layers:
        layer.freeze(0, torch.rand(layer.out_units) < 0.5)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 2, (batch,))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)

    def step(variant) -> None:
        with mock.patch.object(FreezableBatchNorm2d, "forward", variant):
            loss = F.cross_entropy(model.forward_path(x, 1)[0], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return {name: partial(step, variant) for name, variant in variants.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = benchmark_parser(__file__, __doc__, "batch 2, 2 rounds of 1 call", rounds=7, repeats=20)
    args = parser.parse_args(argv)
    rounds, repeats, batch = (2, 1, 2) if args.tiny else (args.rounds, args.repeats, 32)
    rows = []
    with torch_threads(args.threads):
        machine = machine_columns()
        for channels, size in SHAPES:
            for share in FROZEN_SHARES:
                norm = FreezableBatchNorm2d(channels).train()
                norm.frozen[: int(share * channels)] = True
                with torch.no_grad():
                    norm.running_mean.normal_()
                    norm.running_var.uniform_(0.5, 2.0)
                    norm.weight.uniform_(0.5, 1.5)
                    norm.bias.normal_()
                norms = {name: norm if name == "clbench" else copy.deepcopy(norm) for name in VARIANTS}
                forwards = {name: partial(variant, norms[name]) for name, variant in VARIANTS.items()}
                x = torch.randn(batch, channels, size, size).to(memory_format=torch.channels_last).requires_grad_()
                gradient = torch.randn_like(x)
                out, grad = step(norm, x, gradient)
                differences = {"clbench": dict.fromkeys(DIFFERENCES, 0.0)}
                for name in ["constant_frozen", "two_batch_norms", "single_pass"]:
                    other_out, other_grad = step(forwards[name], x, gradient)
                    other = norms[name]
                    differences[name] = {
                        "max_output_difference": (out - other_out).abs().max().item(),
                        "max_gradient_difference": (grad - other_grad).abs().max().item(),
                        "max_statistics_difference": max((norm.running_mean - other.running_mean).abs().max().item(),
                                                         (norm.running_var - other.running_var).abs().max().item())}
                times = interleaved_times({name: partial(step, forward, x, gradient)
                                           for name, forward in forwards.items()}, rounds, repeats)
                for name, measured in times.items():
                    rows.append({"scope": "batch_norm", "channels": channels, "size": size, "frozen_share": share,
                                 "variant": name, **best_and_median_ms(measured),
                                 "ratio_to_clbench_best": round(min(measured) / min(times["clbench"]), 2),
                                 **differences[name], "rounds": rounds, "repeats": repeats, **machine})
        width = 4 if args.tiny else 16
        times = interleaved_times(ccgn_steps(VARIANTS, width, batch), rounds, max(1, repeats // 4))
        for name, measured in times.items():
            rows.append({"scope": "ccgn_step", "channels": width, "size": 32, "frozen_share": 0.5, "variant": name,
                         **best_and_median_ms(measured),
                         "ratio_to_clbench_best": round(min(measured) / min(times["clbench"]), 2),
                         "rounds": rounds, "repeats": max(1, repeats // 4), **machine})
    for row in rows:
        print(f"{row['scope']:<10} {row['channels']:>3} ch {row['size']:>2}x{row['size']:<2} "
              f"frozen {row['frozen_share']:.2f} "
              f"{row['variant']:<15}: {row['best_ms']:7.3f} ms best, {row['median_ms']:7.3f} median, "
              f"{row['ratio_to_clbench_best']:.2f}x clbench's")
    print(machine_line(machine))
    write_csv(rows, COLUMNS, args.output)
    return rows


if __name__ == "__main__":
    main()

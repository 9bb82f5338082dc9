"""The small CNN's max-pooling before its ReLU (clbench's order since session 18) against
the ReLU before the pooling (the former order), which compute the same values and
gradients: the largest of four values, activated, is the largest of the four activated.
Three workloads: a training step of the small CNN (width 32; forward, cross-entropy,
backward) at batch 64, the Split MNIST preset's; its forward pass at batch 512, clbench's
evaluation batch; and the training step of ccgn's masked small CNN on its first task's
path (gates and all). The script first checks that both orders give the same outputs and
gradients (largest differences in the table), then times them interleaved (A B A B ...,
`--rounds` rounds of `--repeats` calls); best and median per call.

Usage: python benchmarks/pool_before_relu.py [--threads 1] [--tiny]
"""

from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from clbench import path_network
from clbench.benchmarking import (benchmark_parser, best_and_median_ms, interleaved_times, machine_columns,
                                  machine_line, torch_threads, write_csv)
from clbench.models import ModelSpec, SmallCNN, channels_last
from clbench.registry import get_strategy

ORDERS = ["pool_then_relu", "relu_then_pool"]  # clbench's, the former
COLUMNS = ["workload", "order", "batch", "best_ms", "median_ms", "speed_vs_relu_first", "max_output_difference",
           "max_gradient_difference", "rounds", "repeats", "machine", "cores", "torch_threads", "python", "torch",
           "avalanche", "clbench_commit"]


def relu_then_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(F.relu(x), 2)


def relu_first(body: nn.Sequential) -> nn.Sequential:
    """The layers of `body` (the same modules), each ReLU moved before the max-pooling it follows."""
    layers = list(body)
    for pool in [index for index, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d)]:
        layers[pool], layers[pool + 1] = layers[pool + 1], layers[pool]
    return nn.Sequential(*layers)


def workloads(width: int, train_batch: int, eval_batch: int) -> dict:
    """Per workload and order, a call returning its output and the gradients it computed."""
    torch.manual_seed(0)
    network = SmallCNN(1, width)
    head = nn.Linear(network.out_features, 10)
    parameters = [*network.parameters(), *head.parameters()]
    # In the layout the small CNN converts them to, so that its layers can run on them directly.
    x, y = channels_last(torch.randn(train_batch, 1, 28, 28)), torch.randint(0, 10, (train_batch,))
    images = channels_last(torch.randn(eval_batch, 1, 28, 28))
    spec = ModelSpec("small_cnn", width, (1, 28, 28), "task", [[0, 1], [2, 3]])
    gated = get_strategy("ccgn").from_hparams({}).make_model(spec).train()
    gated_parameters = [p for p in gated.parameters() if p.requires_grad]

    def step(forward, params):
        out = forward()
        loss = F.cross_entropy(out, y % out.shape[1])
        return out, torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)

    def evaluate(model):
        with torch.no_grad():
            return model(images), ()

    def gated_step(then):
        torch.manual_seed(0)  # the same gate noise for both orders
        with mock.patch.object(path_network, "pool_and_relu", then):
            return step(lambda: gated.forward_path(x, 0)[0], gated_parameters)

    dense = {"pool_then_relu": network.body, "relu_then_pool": relu_first(network.body)}
    return {"small_cnn_train": {order: lambda m=body: step(lambda: head(m(x)), parameters)
                                for order, body in dense.items()},
            "small_cnn_eval": {order: lambda m=body: evaluate(m) for order, body in dense.items()},
            "ccgn_train": {"pool_then_relu": lambda: gated_step(path_network.pool_and_relu),
                           "relu_then_pool": lambda: gated_step(relu_then_pool)}}


def largest_differences(first, second) -> tuple[float, float]:
    (out, grads), (other_out, other_grads) = first, second
    gradient = max(((a - b).abs().max().item() for a, b in zip(grads, other_grads, strict=True)), default=0.0)
    return (out - other_out).abs().max().item(), gradient


def main(argv: list[str] | None = None) -> list[dict]:
    parser = benchmark_parser(__file__, __doc__, "width 4, batches 4 and 8, 2 rounds of 1 call", rounds=7, repeats=10)
    args = parser.parse_args(argv)
    rounds, repeats, width, train_batch, eval_batch = (2, 1, 4, 4, 8) if args.tiny else (
        args.rounds, args.repeats, 32, 64, 512)
    rows = []
    with torch_threads(args.threads):
        machine = machine_columns()
        for workload, calls in workloads(width, train_batch, eval_batch).items():
            output, gradient = largest_differences(*(calls[order]() for order in ORDERS))
            times = interleaved_times(calls, rounds, repeats)
            for order, measured in times.items():
                rows.append({"workload": workload, "order": order,
                             "batch": eval_batch if workload.endswith("eval") else train_batch,
                             **best_and_median_ms(measured),
                             "speed_vs_relu_first": round(min(times["relu_then_pool"]) / min(measured), 2),
                             "max_output_difference": output, "max_gradient_difference": gradient,
                             "rounds": rounds, "repeats": repeats, **machine})
    for row in rows:
        print(f"{row['workload']:<16} {row['order']:<15} batch {row['batch']:>3} {row['best_ms']:>9.3f} ms best "
              f"{row['median_ms']:>9.3f} median  {row['speed_vs_relu_first']:.2f}x  differences "
              f"{row['max_output_difference']:.1e} / {row['max_gradient_difference']:.1e}")
    print(machine_line(machine))
    write_csv(rows, COLUMNS, args.output)
    return rows


if __name__ == "__main__":
    main()

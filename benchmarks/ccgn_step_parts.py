"""Where ccgn's training step spends its time beyond its ungated backbone's: one step
(forward through a task's path, cross-entropy plus the mean gate activation, backward,
the frozen kernels' gradients zeroed, and clbench's fused Adam step over what the task
trains) of ccgn's network with parts of the gating taken out, beside the ungated
backbone's step with the same Adam on the same batch (batch 32, the embedded Split
MNIST's image size), for the small CNN and a narrow ResNet-18:
- ungated: the dense backbone (`clbench.models.build_model`), what naive_adam trains;
- open_masks: ccgn's masked layers with every mask 1 and no gating module: the masked
  layers' own cost (the multiplication by the mask and its bookkeeping);
- no_noise: the gating modules without the Gumbel noise and its relaxation (the hard
  gate with the logits' gradient straight through): the gating modules' cost;
- ccgn: ccgn's step as it trains a first task, no channel frozen;
- ccgn_frozen: a second task's step after the first froze half of every layer's kernels,
  its batch norms' frozen channels not learning (ccgn's training);
- ccgn_frozen_learning: the same with the frozen channels' weight and bias learning (as
  `FreezableBatchNorm2d` trains them for HAT): what `frozen_channels_learn` off saves.
The variants alternate for `--rounds` rounds of `--repeats` steps each, after one warm-up
round; best and median ms per step, and each over the (eager) ungated step's best time.
With `--compile` every variant also runs compiled by torch.compile (its forward pass and
loss, and so its backward; the Adam step is one fused kernel already): whether fusing the
gating modules' small operators brings ccgn's step within 1.3x its ungated backbone's.
Each compiled step is first checked to give its eager twin's loss (the same Gumbel noise:
inductor draws it as eager does), or the script stops.

Usage: python benchmarks/ccgn_step_parts.py --threads 1 [--compile] [--tiny]
"""

from __future__ import annotations

from contextlib import nullcontext
from unittest import mock

import torch
import torch.nn.functional as F

from clbench.benchmarking import (benchmark_parser, best_and_median_ms, interleaved_times, machine_columns,
                                  machine_line, positive_width, torch_threads, write_csv)
from clbench.gates import GatedLayer
from clbench.models import ModelSpec, build_model
from clbench.path_network import FreezableBatchNorm2d, TaskPathNet, positions_mean
from clbench.path_training import other_tasks_parameters
from clbench.registry import build_optimizer, get_strategy

COLUMNS = ["backbone", "width", "variant", "compiled", "best_ms", "median_ms", "ratio_to_ungated_best", "batch", "rounds",
           "repeats", "machine", "cores", "torch_threads", "python", "torch", "avalanche", "clbench_commit"]
CCGN = get_strategy("ccgn").from_hparams({})


def open_masks(layer: GatedLayer, x: torch.Tensor, task: int, trace) -> torch.Tensor:
    return x.new_ones(len(x), layer.out_units)


def noiseless_gates(layer: GatedLayer, x: torch.Tensor, task: int, trace) -> torch.Tensor:
    logits = layer.gates[task](positions_mean(x))
    return logits + ((logits > 0).to(logits.dtype) - logits).detach()


# Each variant: whether it runs ccgn's network, the task trained, the mask in place of
# ccgn's (None: ccgn's own) and whether the frozen channels learn.
VARIANTS = {"ungated": (False, 0, None, False), "open_masks": (True, 0, open_masks, False),
            "no_noise": (True, 0, noiseless_gates, False), "ccgn": (True, 0, None, False),
            "ccgn_frozen": (True, 1, None, False), "ccgn_frozen_learning": (True, 1, None, True)}


def trained_parameters(model: TaskPathNet, task: int) -> list[torch.Tensor]:
    """What ccgn's optimiser trains on `task` (`TaskPathTraining.make_optimizer`)."""
    left_out = set(map(id, other_tasks_parameters(model, task)))
    return [p for p in model.parameters() if id(p) not in left_out]


def training_step(variant: str, spec: ModelSpec, x: torch.Tensor, y: torch.Tensor, compiled: bool):
    """One training step of `variant` (a fresh network, seeded alike) as a call returning
    its loss; with `compiled`, its forward pass and loss compiled by torch.compile (and so
    its backward)."""
    gated, task, mask, frozen_learn = VARIANTS[variant]
    torch.manual_seed(0)
    masks = mock.patch.object(GatedLayer, "mask", mask) if mask else nullcontext()
    if not gated:
        model = build_model(spec).train()
        optimizer = build_optimizer("adam", model.parameters(), CCGN.hp.lr)
        # Its task's head called directly, as ccgn's `forward_path`: Avalanche's dispatch
        # by task label loops over the batch's tasks, which torch.compile cannot trace.
        loss = lambda: F.cross_entropy(model.forward_single_task(x, 0), y)  # noqa: E731
    else:
        model = CCGN.make_model(spec).train()
        for layer in model.path_layers:
            if task:
                layer.freeze(0, torch.rand(layer.out_units) < 0.5)
            for norm in layer.kernel_modules():
                if isinstance(norm, FreezableBatchNorm2d):
                    norm.frozen_channels_learn = frozen_learn
        optimizer = build_optimizer("adam", trained_parameters(model, task), CCGN.hp.lr)

        def loss() -> torch.Tensor:
            logits, trace = model.forward_path(x, task)
            sparsity = torch.stack([gates.mean() for gates in trace.masks]).mean()
            return F.cross_entropy(logits, y) + CCGN.hp.sparsity * sparsity

    if compiled:
        # torch.compile keeps its graphs by code object, and its guards do not see
        # `GatedLayer.mask` patched: variants sharing `loss`'s code ran the first one's graph.
        loss.__code__ = loss.__code__.replace(co_name=f"{variant}_loss")
        loss = torch.compile(loss, fullgraph=True)
    gated_layers = model.path_layers if gated else []

    def step() -> torch.Tensor:
        optimizer.zero_grad()
        with masks:
            value = loss()
            value.backward()
        for layer in gated_layers:  # ccgn's `optimizer_step`
            layer.mask_frozen_gradients()
        optimizer.step()
        return value.detach()

    return step


def check_compiled_losses(steps: dict, backbone: str) -> None:
    """Each compiled variant's first step gives the loss of its eager twin's first step,
    both drawing the same noise, within float tolerance."""
    for name in VARIANTS:
        losses = []
        for compiled in (False, True):
            torch.manual_seed(1)
            losses.append(steps[name, compiled]())
        if not torch.allclose(*losses, rtol=1e-4, atol=1e-5):
            raise SystemExit(f"{backbone} {name}: the compiled step's loss {losses[1]:.6f} is not the eager "
                             f"step's {losses[0]:.6f}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = benchmark_parser(__file__, __doc__, "narrow networks, batch 4, 2 rounds of 1 step", rounds=10, repeats=10)
    parser.add_argument("--resnet-width", type=positive_width, default=8,
                        help="ResNet-18's first-stage width [%(default)s]")
    parser.add_argument("--backbones", nargs="+", choices=["small_cnn", "resnet18"], default=["small_cnn", "resnet18"])
    parser.add_argument("--compile", action="store_true",
                        help="also time every variant compiled by torch.compile (minutes of compiling first)")
    args = parser.parse_args(argv)
    rounds, repeats, batch = (2, 1, 4) if args.tiny else (args.rounds, args.repeats, 32)
    widths = {"small_cnn": 4 if args.tiny else 32, "resnet18": 2 if args.tiny else args.resnet_width}
    torch.manual_seed(0)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 2, (batch,))
    rows = []
    with torch_threads(args.threads), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), \
            torch._inductor.config.patch(fallback_random=True):
        machine = machine_columns()
        for backbone in args.backbones:
            spec = ModelSpec(backbone, widths[backbone], (1, 28, 28), "task", [[0, 1], [2, 3]])
            steps = {(name, compiled): training_step(name, spec, x, y, compiled)
                     for compiled in ((False, True) if args.compile else (False,)) for name in VARIANTS}
            if args.compile:
                check_compiled_losses(steps, backbone)
            interleaved_times(steps, 1, repeats)  # warm-up (the check above compiled)
            times = interleaved_times(steps, rounds, repeats)
            ungated = min(times["ungated", False])
            rows += [{"backbone": backbone, "width": widths[backbone], "variant": name, "compiled": compiled,
                      **best_and_median_ms(measured), "ratio_to_ungated_best": round(min(measured) / ungated, 3),
                      "batch": batch, "rounds": rounds, "repeats": repeats, **machine}
                     for (name, compiled), measured in times.items()]
    for row in rows:
        print(f"{row['backbone']:<9} {row['width']:>3} {row['variant']:<21}{' compiled' if row['compiled'] else '':<9}: "
              f"{row['best_ms']:8.3f} ms best, {row['median_ms']:8.3f} median, "
              f"{row['ratio_to_ungated_best']:.2f}x the eager ungated step")
    print(machine_line(machine))
    write_csv(rows, COLUMNS, args.output)
    return rows


if __name__ == "__main__":
    main()

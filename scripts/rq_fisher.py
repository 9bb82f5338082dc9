"""On which forward pass should EWC measure importances in a relaxed-quantisation run?
Avalanche's EWC computes them with a forward pass in eval mode: before session 14 that saw
the latent float weights, a network training never ran; relaxed_quant now rounds the
weights to their grids there. This recomputes the last learned task's importances
(Avalanche's own computation, on that task's training data) on three forwards of one
checkpoint, for the quantised layers' weights:
  latent  - the float latent weights (what EWC used before);
  relaxed - relaxed samples at the temperature training ended at, as training saw them;
  hard    - the weights rounded to their grids (the deployed network), gradients passed
            straight through the rounding to the latent weights (what EWC uses now);
with the loss of each forward and the largest and mean importance, overall and per layer.

    python scripts/rq_fisher.py RUN_DIR [--examples 2000] [--top 5]
"""

import argparse
from contextlib import contextmanager
from pathlib import Path

import torch
from avalanche.training.plugins import EWCPlugin
from torch import nn
from torch.nn.utils import parametrize

from clbench.modules.ptq import quantised_layers
from clbench.modules.relaxed_quant import GRID
from clbench.runner import load_checkpointed_run

FORWARDS = ("latent", "relaxed", "hard")
PARAMETRISED = ".parametrizations.weight.original"


class GridForward(nn.Module):
    """A parametrisation calling one of a grid's forwards."""

    def __init__(self, forward_on_grid):
        super().__init__()
        self.forward_on_grid = forward_on_grid

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.forward_on_grid(weight)


@contextmanager
def forward_on(model: nn.Module, forward: str):
    """The model's quantised layers compute with their weights as `forward` says (the
    layers' own hooks, which pass the weights through the grid, set aside meanwhile)."""
    layers = quantised_layers(model)
    hooks = [(dict(layer._forward_pre_hooks), dict(layer._forward_hooks)) for layer in layers]
    for layer in layers:
        layer._forward_pre_hooks.clear()
        layer._forward_hooks.clear()
        if forward != "latent":
            grid = getattr(layer, GRID)
            parametrize.register_parametrization(
                layer, "weight", GridForward(grid.relaxed if forward == "relaxed" else grid.straight_through), unsafe=True)
    try:
        yield
    finally:
        for layer, (pre_hooks, post_hooks) in zip(layers, hooks):
            if forward != "latent":
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            layer._forward_pre_hooks.update(pre_hooks)
            layer._forward_hooks.update(post_hooks)


def weight_importances(trainer, dataset, forward: str, batch_size: int) -> tuple[dict[str, torch.Tensor], float]:
    """The quantised layers' weight importances on `forward`, by layer name, and the mean loss."""
    model, criterion = trainer.model, trainer._criterion
    plugin = next((p for p in trainer.plugins if isinstance(p, EWCPlugin)), None)
    if plugin is None:
        raise SystemExit("the checkpoint is not an EWC run's")
    quantised = {id(layer) for layer in quantised_layers(model)}
    layers = [name for name, module in model.named_modules() if id(module) in quantised]
    if not all(hasattr(model.get_submodule(name), GRID) for name in layers):
        raise SystemExit("the checkpoint's layers have no relaxed-quantisation grid: not a relaxed_quant run")
    losses = []
    hook = criterion.register_forward_hook(lambda module, inputs, loss: losses.append(loss.item()))
    with forward_on(model, forward):
        importances = plugin.compute_importances(model, criterion, trainer.optimizer, dataset, trainer.device,
                                                 batch_size)
    hook.remove()
    suffix = ".weight" if forward == "latent" else PARAMETRISED
    return {name: importances[name + suffix].data for name in layers}, sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--examples", type=int, default=2000, help="first examples of the task's training set [%(default)s]")
    parser.add_argument("--top", type=int, default=5, help="layers shown, largest importance first [%(default)s]")
    args = parser.parse_args(argv)
    cfg, scenario, state = load_checkpointed_run(args.run_dir)
    trainer, task = state["trainer"], len(state["progress"]["after_each_task"])
    dataset = scenario.benchmark.train_stream[task - 1].dataset
    dataset = dataset.subset(range(min(args.examples, len(dataset))))
    torch.manual_seed(0)  # the relaxed samples
    measured = {forward: weight_importances(trainer, dataset, forward, cfg.batch_size) for forward in FORWARDS}
    print(f"task {task}'s importances on {len(dataset)} of its training examples; "
          f"lr * 2 * lambda = {2 * cfg.lr * cfg.hparams['ewc_lambda']:.3g}")
    print("| forward | loss | largest F | mean F | layer of the largest |")
    print("|---|---|---|---|---|")
    for forward, (importances, loss) in measured.items():
        largest = max(importances, key=lambda name: importances[name].max())
        mean = torch.cat([f.flatten() for f in importances.values()]).mean().item()
        print(f"| {forward} | {loss:.3f} | {importances[largest].max().item():.3g} | {mean:.3g} | {largest} |")
    print()
    print("| layer | " + " | ".join(f"largest F {forward}" for forward in FORWARDS) + " |")
    print("|---|" + "---|" * len(FORWARDS))
    latent = measured["latent"][0]
    for name in sorted(latent, key=lambda name: latent[name].max(), reverse=True)[: args.top]:
        print(f"| {name} | " + " | ".join(f"{measured[forward][0][name].max().item():.3g}" for forward in FORWARDS) + " |")


if __name__ == "__main__":
    main()

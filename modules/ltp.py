"""Learned-threshold pruning (Azarian et al. 2020, arXiv:2003.00075) while the strategy
trains, and the hard-pruned network it leads to.

Training: every nn.Conv2d and nn.Linear weight w of layer l of the backbone is replaced
by w * sigmoid((w^2 - tau_l) / T_l) through `torch.nn.utils.parametrize`, and the loss
gains the paper's differentiable L0 term, the sum of those soft masks, times `l0_weight`.
The thresholds tau_l are parameters of the network, so the template's optimiser trains
them with the weights: they are attached before the first task (`before_training`), and
Avalanche's `make_optimizer`, called at the start of every task, adds parameters it has
not seen to the optimiser.

Deployed (the variant `ltp`, after every task): a copy with plain weights, those with
w^2 < tau_l exactly zero, the others as trained.

Choices where the paper leaves room or this differs from it:
- The task loss reaches a weight through its mask as through a constant (dv/dw = mask,
  the paper's eq. 14 as a public reimplementation reads it); the thresholds, and the L0
  term, get their exact gradients. With the exact dv/dw, which adds
  (2 w^2 / T) mask (1 - mask), EWC (ewc_lambda 1000) diverged on split_mnist_mini in the
  third task: the slope multiplies the Fisher of the weights near a threshold.
- tau_l and T_l are in units of the layer's mean squared weight when the thresholds are
  attached (tau_l = threshold_l * s_l, T_l = temperature * s_l); the paper too sets its
  temperature from the weights' variance (its eq. 15, as the same reimplementation cites
  it). The layers' weights differ in scale by orders of magnitude (the first conv's
  w^2 ~ 0.04, the fully connected layer's ~ 2e-4): with thresholds in units of w^2 one
  learning rate could not suit all of them.
- The heads are not pruned (the paper prunes every layer): in the class setting the head
  holds the rows of classes not seen yet, in the task setting the heads of later tasks
  are untrained; either would be pruned before its task. They are 0.6% of the weights of
  the small CNN.
- The L0 term is divided by the number of pruned weights (it is the soft share of weights
  kept), so `l0_weight` does not depend on the network's size. Every weight counts alike,
  as in the paper: the large layers, which hold the model size, are pruned most.
- `target_sparsity` (not in the paper, which picks a network from the trail of ever
  sparser ones): while hard pruning would leave the network sparser than the target, the
  L0 term's sign is flipped, so the thresholds are pushed down as well as up and the
  sparsity holds at the target (0.50 after each of five tasks for a target of 0.5)
  instead of growing with every task. Switching the term off above the target instead
  overshoots it (0.59 to 0.62): with momentum the thresholds keep rising, and the task
  loss barely lowers them, as a pruned weight's mask passes it almost no gradient.
- Defaults (the paper's values for these units are not known here): temperature 0.05
  (the soft mask goes from 0.12 to 0.88 within +-0.1 mean squared weights of the
  threshold), threshold 0 (training starts from the dense network), l0_weight 1. On
  split_mnist_mini (naive, task setting, one epoch per task, SGD 0.01 with momentum 0.9)
  75% of the weights are pruned after the first task and 91% after the fifth, and the
  pruned network's average accuracy after the fifth is 0.9715 (0.9785 without ltp).

Protected weights: per-layer thresholds are shared by all tasks and keep learning, so a
threshold that rises later would prune (and already soft-masks) weights a past task
relies on. With ccgn the kernels (output channels) a learned task froze are pruned for
good when they freeze: after each task their weights are replaced by their hard-pruned
values (below the threshold exactly zero, the others unscaled), and from then on they are
outside the soft mask, whatever the thresholds do. A past task's path therefore never
changes, in the float network and in the deployed one (tested); free kernels, which
ccgn re-initialises before each task, are pruned by the thresholds as they stand. A task
is evaluated after its kernels are fixed, so its float accuracy is that of its
hard-pruned kernels. hat and hat_tc are refused: HAT protects each weight in proportion
to the attention of the units it joins, not whole kernels, so no weight is ever done
with; packnet too, which keeps each task's weights fixed by its own pruning. With the
other strategies pruning past tasks' weights is part of what is measured (forgetting@ltp).

Measures: `sparsity`, the share of the pruned layers' weights that are zero;
`model_size_bits`, the nonzero weights at 32 bits plus one bit per weight of a pruned layer
(the bitmap that says where they are) plus every other parameter and buffer as stored.
The paper's compression ratios count the nonzero weights only. `executed_macs@ltp` is the
dense count: unstructured zeros are still multiplied by dense kernels, which is what
PyTorch's FLOP counter counts.
"""

from __future__ import annotations

import copy

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.packnet import PackNetModule
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import Dataset

from clbench.errors import UserError
from clbench.models import model_size_bytes, unparametrise
from clbench.gates import GatedLayer
from clbench.path_network import PathLayer, TaskPathNet
from clbench.registry import Module, ModuleOptions, Variant, register_module


class SoftThreshold(nn.Module):
    """The parametrisation w -> w * sigmoid((w^2 / s - threshold) / temperature) of one
    layer's weight, s its mean squared value when attached; `hard`: w * (w^2 / s >=
    threshold), the deployed weight. Rows (kernels) marked `fixed` hold their pruned
    weights already: they are kept where nonzero, whatever the threshold."""

    def __init__(self, weight: torch.Tensor, threshold: float, temperature: float):
        super().__init__()
        self.register_buffer("scale", weight.detach().pow(2).mean())
        self.register_buffer("fixed", torch.zeros(len(weight), dtype=torch.bool, device=weight.device))
        self.threshold = nn.Parameter(torch.tensor(threshold, device=weight.device))
        self.temperature = temperature
        self.hard = False

    def rows_fixed(self, weight: torch.Tensor) -> torch.Tensor:
        return self.fixed.view(-1, *[1] * (weight.dim() - 1))

    def kept(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.where(self.rows_fixed(weight), weight != 0, weight.pow(2) / self.scale >= self.threshold)

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        if self.hard:
            return self.kept(weight).to(weight.dtype)
        soft = torch.sigmoid((weight.pow(2) / self.scale - self.threshold) / self.temperature)
        return torch.where(self.rows_fixed(weight), (weight != 0).to(weight.dtype), soft)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask(weight.detach())  # the paper's eq. (14): dv/dw = mask


def pruned_layers(model: nn.Module) -> list[nn.Conv2d | nn.Linear]:
    """The conv and linear layers of the shared backbone (`features` of clbench's networks,
    which iCaRL's template holds as `feature_extractor`; the masked layers of ccgn's, not
    its gating modules), not the heads."""
    if isinstance(model, TaskPathNet):
        return [m for _, m in path_layer_weights(model)]
    backbone = model.features if hasattr(model, "features") else model.feature_extractor
    return [m for m in backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def path_layer_weights(model: TaskPathNet) -> list[tuple[PathLayer, nn.Conv2d | nn.Linear]]:
    """Each masked layer's conv or linear layers (a projection shortcut's with its layer's)."""
    return [(path_layer, m) for path_layer in model.path_layers for m in [path_layer.layer, *(path_layer.tied or [])]
            if isinstance(m, (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def prune_frozen_kernels_for_good(model: TaskPathNet) -> None:
    """ccgn: the kernels frozen since the last call take their hard-pruned weights and
    leave the soft mask (`SoftThreshold.fixed`)."""
    for path_layer, layer in path_layer_weights(model):
        weight, soft = layer.parametrizations.weight.original, layer.parametrizations.weight[0]
        newly = path_layer.frozen & ~soft.fixed
        weight[newly] = torch.where(soft.kept(weight)[newly], weight[newly], 0.0)
        soft.fixed |= newly


def attach(model: nn.Module, threshold: float, temperature: float) -> None:
    """Soft thresholds on every conv and linear weight that has none yet."""
    for layer in pruned_layers(model):
        if not parametrize.is_parametrized(layer, "weight"):
            parametrize.register_parametrization(layer, "weight", SoftThreshold(layer.weight, threshold, temperature))


def thresholds(model: nn.Module) -> list[tuple[torch.Tensor, SoftThreshold]]:
    """Each soft-thresholded layer's raw weight and its threshold."""
    return [(layer.parametrizations.weight.original, layer.parametrizations.weight[0]) for layer in pruned_layers(model)
            if parametrize.is_parametrized(layer, "weight")]


def kept_share(model: nn.Module) -> torch.Tensor:
    """The paper's L0 term, the sum of the soft masks, over the number of weights."""
    masks = [threshold.mask(weight) for weight, threshold in thresholds(model)]
    return sum(mask.sum() for mask in masks) / sum(mask.numel() for mask in masks)


@torch.no_grad()
def hard_sparsity(model: nn.Module) -> float:
    """The share of the soft-thresholded weights that hard pruning would zero."""
    kept = [threshold.kept(weight) for weight, threshold in thresholds(model)]
    return 1 - sum(k.sum().item() for k in kept) / sum(k.numel() for k in kept)


def deployed(model: nn.Module, threshold: float, temperature: float) -> nn.Module:
    """A copy of `model` hard-pruned at its thresholds (the initial ones where it has none
    yet): plain weights, those with w^2 < tau exactly zero."""
    pruned = copy.deepcopy(model)
    attach(pruned, threshold, temperature)
    for _, soft_threshold in thresholds(pruned):
        soft_threshold.hard = True
    return unparametrise(pruned)


class LearnedThresholds(SupervisedPlugin):
    """Attaches the soft thresholds before the first task; adds the L0 term to every loss."""

    def __init__(self, options: LearnedThresholdPruning.Options):
        super().__init__()
        self.options = options

    def before_training(self, strategy, **kwargs):
        # Before the template's first make_optimizer, which adds the thresholds to the optimiser.
        attach(strategy.model, self.options.initial_threshold, self.options.temperature)

    def after_training_exp(self, strategy, **kwargs):
        # After the template's own, where ccgn froze the task's kernels; before evaluation.
        if isinstance(strategy.model, TaskPathNet):
            prune_frozen_kernels_for_good(strategy.model)

    def before_backward(self, strategy, **kwargs):
        target, weight = self.options.target_sparsity, self.options.l0_weight
        if target is not None and hard_sparsity(strategy.model) > target:
            weight = -weight
        strategy.loss = strategy.loss + weight * kept_share(strategy.model)


@register_module
class LearnedThresholdPruning(Module):
    """Learned-threshold pruning (Azarian et al. 2020): per-layer thresholds learned through
    a soft mask and an L0 term while the strategy trains; variant `ltp`, the network
    hard-pruned at those thresholds. With ccgn a task's kernels are pruned for good when
    they freeze; not with hat, hat_tc or packnet."""

    name = "ltp"
    reparametrises_weights = True

    class Options(ModuleOptions):
        temperature: float = Field(0.05, gt=0, description="T of the soft mask, in the layer's mean squared weights")
        l0_weight: float = Field(1.0, ge=0, description="lambda: weight of the L0 term (soft share of weights kept)")
        initial_threshold: float = Field(0.0, ge=0, description="tau at the start, in the layer's mean squared weights")
        target_sparsity: float | None = Field(
            None, gt=0, lt=1, description="above this hard-pruned sparsity the L0 term's sign is flipped (none: never)")

    def check_model(self, model: nn.Module) -> None:
        gated = isinstance(model, TaskPathNet) and all(isinstance(m, GatedLayer) for m in model.path_layers)
        if isinstance(model, PackNetModule) or (isinstance(model, TaskPathNet) and not gated):
            raise UserError("ltp cannot run with hat, hat_tc or packnet: its per-layer thresholds are shared by all "
                            "tasks and keep learning, so they would prune weights these strategies keep for past "
                            "tasks (ccgn's, whole kernels, are pruned for good when they freeze)")

    def plugins(self) -> list[SupervisedPlugin]:
        return [LearnedThresholds(self.options)]

    def variants(self, model: nn.Module, calibration: Dataset, n_tasks: int) -> dict[str, Variant]:
        pruned = deployed(model, self.options.initial_threshold, self.options.temperature)
        weights = [layer.weight for layer in pruned_layers(pruned)]
        nonzero = sum(w.count_nonzero().item() for w in weights)
        total = sum(w.numel() for w in weights)
        bits = weights[0].element_size() * 8
        size_bits = model_size_bytes(pruned) * 8 - (total - nonzero) * bits + total  # zeros dropped, a bitmap added
        return {"ltp": Variant(pruned, {"model_size_bits": size_bits, "sparsity": 1 - nonzero / total})}

"""Relaxed quantisation (Louizos et al., ICLR 2019, arXiv:1810.01875): quantisation-aware
training on a learnable grid, deployed as the hard-quantised network.

Each conv/linear layer has a grid of 2**bits points alpha * (i + offset), i from
-2**(bits-1) to 2**(bits-1) - 1, with a learnable scale alpha and offset. In a training
forward pass every weight w is replaced by a sample of a relaxed categorical (concrete,
Gumbel-softmax) distribution over the grid points: the probability of a point is the mass
that logistic noise of scale sigma (learnable) centred on w puts in the point's cell (half
a step either side; the outermost cells reach to infinity), from the logistic CDF. The
sample's value is the grid points weighted by the relaxed one-hot vector, so gradients
reach w, alpha, the offset and sigma. The temperature falls exponentially from
`temperature` to `final_temperature` over each task's training iterations; as it nears 0
(and sigma with it) the sample becomes rounding to the nearest grid point, which is the
deployed network: variant `rq_w<bits>`, every quantised layer's weights rounded to its
grid, model size with those weights at `bits` bits and everything else (the grids
included) as stored.

Choices where the paper is not followed or not known here:
- Weights only: activations stay float (the paper also quantises them). Relaxing them too
  would multiply their training memory by the candidate points and need grids set from
  data; not built.
- Local grid: only the 5 grid points nearest to the weight are candidates, their
  probabilities renormalised, so that memory does not grow with 2**bits (a 2-bit grid
  has 4 points, all candidates). How the paper truncates the grid is not known here.
- Initialisation, once, when training starts: alpha from the weights' largest magnitude
  (symmetric range, as ptq), offset 0, sigma a third of a step. The offset and sigma are
  in grid steps, alpha and sigma learnt in log space (positive, steps relative to their
  value).
- The run's float results are the latent weights', which training does not evaluate.
- Importances a strategy estimates with gradients outside its training steps (EWC's
  Fisher information, computed in eval mode) are the deployed network's: in eval mode the
  weights are rounded to the grid, gradients passed straight through to the latent
  weights. The latent float network is not what was trained (on Split CIFAR-10 its loss
  was twice the deployed one's and its importances 16 times larger on average after task
  1, which made EWC diverge at lambda 100 and, on one seed, 10; `scripts/rq_fisher.py`).
- The grids are parameters of the model (a `relaxed_grid` module on each layer), added
  before the strategy's optimiser is built, so they train with the run's optimiser and
  are saved in checkpoints.
- Temperatures 1 to 0.1 chosen, not the paper's (not known here).
- Not for ccgn and HAT (an error): every task's path shares a layer's grid, which keeps
  learning, so the quantised predictions of a past task would change.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from clbench.modules.ptq import quantised_layers, quantised_measures
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import Dataset

from clbench.errors import UserError
from clbench.path_network import TaskPathNet
from clbench.registry import Module, ModuleOptions, Variant, register_module

LOCAL_GRID = 5  # candidate grid points per weight, centred on the nearest
INITIAL_SIGMA = 1 / 3  # logistic noise scale at initialisation, in grid steps
SMALLEST_PROBABILITY = 1e-30  # floor before the log: a zero probability would give a NaN gradient
GRID = "relaxed_grid"  # the attribute of each quantised layer that holds its LayerGrid


class LayerGrid(nn.Module):
    """A layer's learnable grid alpha * (i + offset) and logistic noise scale sigma (in grid
    steps); the parametrisation of the layer's weights."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        self.low, self.high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        alpha = weight.detach().abs().max().clamp_min(1e-8) / self.high
        self.log_alpha = nn.Parameter(alpha.log())
        self.offset = nn.Parameter(torch.zeros((), device=weight.device))
        self.log_sigma = nn.Parameter(torch.tensor(INITIAL_SIGMA, device=weight.device).log())
        self.temperature = 1.0

    def hard(self, weight: torch.Tensor) -> torch.Tensor:
        """Each weight rounded to its nearest grid point."""
        alpha = self.log_alpha.exp()
        return alpha * ((weight / alpha - self.offset).round().clamp(self.low, self.high) + self.offset)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """In train mode a relaxed sample of `weight`; in eval mode (EWC's importances, say)
        the deployed weights."""
        return self.relaxed(weight) if self.training else self.straight_through(weight)

    def straight_through(self, weight: torch.Tensor) -> torch.Tensor:
        """The weights rounded to the grid, with gradients passed straight through the rounding."""
        return weight + (self.hard(weight) - weight).detach()

    def relaxed(self, weight: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.log_alpha.exp(), self.log_sigma.exp()
        position = (weight / alpha - self.offset).unsqueeze(-1)  # in grid steps, grid points at integers
        size = min(LOCAL_GRID, self.high - self.low + 1)
        first = (position.detach().round() - size // 2).clamp(self.low, self.high - size + 1)
        points = first + torch.arange(size, device=weight.device)
        below_upper = torch.where(points == self.high, 1.0, torch.sigmoid((points + 0.5 - position) / sigma))
        below_lower = torch.where(points == self.low, 0.0, torch.sigmoid((points - 0.5 - position) / sigma))
        logits = (below_upper - below_lower).clamp_min(SMALLEST_PROBABILITY).log()
        choice = F.gumbel_softmax(logits, tau=self.temperature, dim=-1)
        return alpha * ((choice * points).sum(-1) + self.offset)


def weights_on_grid(layer: nn.Module, args) -> None:
    """Forward pre-hook of a quantised layer: in a pass that computes gradients, its weights
    go through its grid (a parametrisation registered for the layer's pass only, so that
    between passes the model is as the strategy built it and parameter names stay)."""
    if torch.is_grad_enabled():
        parametrize.register_parametrization(layer, "weight", getattr(layer, GRID), unsafe=True)


def latent_weights_again(layer: nn.Module, args, output) -> None:
    """Forward hook of a quantised layer: removes what `weights_on_grid` registered, and
    puts the bias back after the weight, where removal does not: online EWC matches its
    importances of one task with the next's by the order of the parameters."""
    if parametrize.is_parametrized(layer, "weight"):
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        if layer.bias is not None:
            layer._parameters["bias"] = layer._parameters.pop("bias")


class RelaxedWeights(SupervisedPlugin):
    """Gives every quantised layer a grid when training starts, through which its weights
    pass in every forward pass that computes gradients: relaxed samples in training steps,
    the deployed weights in a strategy's importance estimate (see `LayerGrid.forward`)."""

    def __init__(self, bits: int, temperature: float, final_temperature: float):
        super().__init__()
        self.bits, self.temperature, self.final_temperature = bits, temperature, final_temperature

    def before_training(self, strategy, **kwargs):
        for layer in quantised_layers(strategy.model):
            if not hasattr(layer, GRID):
                layer.add_module(GRID, LayerGrid(layer.weight, self.bits))
                layer.register_forward_pre_hook(weights_on_grid)
                layer.register_forward_hook(latent_weights_again)

    def before_training_iteration(self, strategy, **kwargs):
        done = strategy.clock.train_exp_iterations / (strategy.train_epochs * len(strategy.dataloader))
        temperature = self.temperature * (self.final_temperature / self.temperature) ** done
        for layer in quantised_layers(strategy.model):
            getattr(layer, GRID).temperature = temperature


@register_module
class RelaxedQuantisation(Module):
    """Relaxed quantisation (Louizos et al. 2019): quantisation-aware training of the
    weights at `bits` bits on a learnable grid per layer, each weight sampled from a
    concrete relaxation of the categorical distribution over the grid; variant rq_w<bits>,
    the weights rounded to their grids."""

    name = "relaxed_quant"
    reparametrises_weights = True

    class Options(ModuleOptions):
        bits: int = Field(4, ge=2, le=8, description="bit width of the weights (2-8)")
        temperature: float = Field(1.0, gt=0, description="concrete temperature at the start of each task")
        final_temperature: float = Field(0.1, gt=0, description="concrete temperature at the end of each task "
                                                                "(annealed exponentially)")

        @model_validator(mode="after")
        def annealed_down(self):
            if self.final_temperature > self.temperature:
                raise ValueError(f"final_temperature ({self.final_temperature}) must not exceed temperature "
                                 f"({self.temperature})")
            return self

    def check_model(self, model: nn.Module) -> None:
        if isinstance(model, TaskPathNet):
            raise UserError("relaxed_quant does not support ccgn and HAT: every task's path shares a layer's grid, "
                            "which keeps learning, so past tasks' quantised predictions would change")

    def plugins(self) -> list[SupervisedPlugin]:
        return [RelaxedWeights(self.options.bits, self.options.temperature, self.options.final_temperature)]

    def variants(self, model: nn.Module, calibration: Dataset, n_tasks: int) -> dict[str, Variant]:
        bits = self.options.bits
        deployed = copy.deepcopy(model)
        layers = quantised_layers(deployed)
        with torch.no_grad():
            for layer in layers:
                if not hasattr(layer, GRID):  # before training: the grid as initialised
                    layer.add_module(GRID, LayerGrid(layer.weight, bits))
                layer.weight.copy_(getattr(layer, GRID).hard(layer.weight))
        weights = [layer.weight for layer in layers]
        return {f"rq_w{bits}": Variant(deployed, quantised_measures(deployed, weights, bits))}

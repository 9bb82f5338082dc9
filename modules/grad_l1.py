"""Gradient-L1 regularisation for robustness to post-training quantisation (Alizadeh et
al., ICLR 2020, arXiv:2002.07520).

Quantising a tensor moves each of its values by at most half a grid step: a perturbation
bounded in the l_inf norm by some delta, which changes the loss, to first order, by at most
delta times the l1 norm of the loss's gradient. Penalising that norm during training,
weight * sum_l ||dL/dW_l||_1 + activation_weight * sum_l ||dL/dy_l||_1 (W_l a layer's
weights, y_l its input), keeps the loss flat in the directions quantisation moves the
network, at every bit width at once. Its effect is measured by post-training quantisation
in the same run: `--module grad_l1 --module ptq`.

Choices:
- Which tensors: those `ptq` quantises, every conv/linear layer's weights and inputs (in
  ccgn and HAT the wrapped layers, not the gating modules). The network's own input (the
  data) is left out, as it has no gradient; biases too, as ptq keeps them float.
- The loss L is the strategy's loss as it stands when this module's plugin runs: its
  criterion on the mini-batch (with ccgn's and HAT's own regularisers), before the
  penalties other plugins add (EWC, LwF, ...). It is a mean over the mini-batch, so the
  activation term is the mean over samples of each sample's gradient norm.
- The paper's lambda is not known here (not in METHODS.md). Both weights default to
  0.001, which trains on split_mnist_mini with the default SGD; a larger penalty can
  reach its trivial minimum, a network whose output hardly depends on its input (chance
  accuracy), as weight 0.002, or activation_weight 0.01 with weight 0.001, did there.
  Set either to 0 to drop its term.
- Cost: the penalty's gradient is second order, a double backward pass each iteration
  (on split_mnist_mini a task took 1.1 to 2.4 times as long to train, on a shared CPU).
- ccgn and HAT are supported: the penalty's gradient passes through their gradient masks
  like the task loss's, so kernels of past tasks stay frozen (tested for ccgn). ccgn's
  batch-shaping term has a hand-written gradient whose own derivative counts as zero.
"""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin
from clbench.modules.ptq import quantised_layers
from pydantic import Field

from clbench.registry import Module, ModuleOptions, register_module


def gradient_l1(loss: torch.Tensor, weights: list[torch.Tensor], inputs: list[torch.Tensor],
                weight: float, activation_weight: float) -> torch.Tensor:
    """weight * sum ||dloss/dW||_1 + activation_weight * sum ||dloss/dy||_1 over `weights`
    and layer `inputs`, differentiable in the weights (its graph is kept)."""
    grads = torch.autograd.grad(loss, [*weights, *inputs], create_graph=True, allow_unused=True)
    norms = [g.abs().sum() if g is not None else loss.new_zeros(()) for g in grads]
    return weight * sum(norms[:len(weights)]) + activation_weight * sum(norms[len(weights):])


class GradientL1Penalty(SupervisedPlugin):
    """Records the quantised layers' inputs during the training forward pass, then adds the
    gradient-L1 penalty to the strategy's loss before its backward pass."""

    def __init__(self, weight: float, activation_weight: float):
        super().__init__()
        self.weight, self.activation_weight = weight, activation_weight
        self.inputs: list[torch.Tensor] = []
        self.hooks = []

    def record(self, layer, inputs):
        if inputs[0].requires_grad:
            self.inputs.append(inputs[0])

    def before_forward(self, strategy, **kwargs):
        self.hooks = [layer.register_forward_pre_hook(self.record) for layer in quantised_layers(strategy.model)]

    def after_forward(self, strategy, **kwargs):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def before_backward(self, strategy, **kwargs):
        weights = [layer.weight for layer in quantised_layers(strategy.model) if layer.weight.requires_grad]
        penalty = gradient_l1(strategy.loss, weights, self.inputs, self.weight, self.activation_weight)
        strategy.loss = strategy.loss + penalty
        self.inputs = []


@register_module
class GradientL1(Module):
    """Gradient-L1 regularisation (Alizadeh et al. 2020): the L1 norm of the loss's
    gradient with respect to the quantised layers' weights and inputs is added to any
    strategy's training loss, for robustness to post-training quantisation at every bit
    width (measure it with ptq in the same run). No variants of its own."""

    name = "grad_l1"

    class Options(ModuleOptions):
        weight: float = Field(0.001, ge=0, description="lambda_w: weight of the L1 norm of the loss gradient with "
                                                      "respect to the conv/linear weights")
        activation_weight: float = Field(0.001, ge=0, description="lambda_y: weight of the L1 norm of the loss "
                                                                 "gradient with respect to their inputs")

    def plugins(self) -> list[SupervisedPlugin]:
        return [GradientL1Penalty(self.options.weight, self.options.activation_weight)]

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from pydantic import Field

from clbench.registry import Hyperparameters, Strategy, register


class L2Penalty(SupervisedPlugin):
    """Adds l2_lambda / 2 * sum (w - w_prev)^2 to the loss, w_prev the weights after the
    previous task. Only weights the previous tasks trained are anchored, so the heads of
    tasks not seen yet start free."""

    def __init__(self, l2_lambda: float):
        super().__init__()
        self.l2_lambda = l2_lambda
        self.anchor: dict[str, torch.Tensor] = {}

    def before_backward(self, strategy, **kwargs):
        weights = dict(strategy.model.named_parameters())
        penalty = sum(((weights[name] - old) ** 2).sum() for name, old in self.anchor.items())
        strategy.loss += self.l2_lambda / 2 * penalty

    def after_training_exp(self, strategy, **kwargs):
        self.anchor = {name: w.detach().clone() for name, w in strategy.model.named_parameters()
                       if w.grad is not None}


@register
class L2(Strategy):
    """L2 regularisation towards the previous task's weights: EWC with every weight equally
    important (the L2 baseline of Kirkpatrick et al. 2017). Untuned default weight."""

    name = "l2"

    class Hparams(Hyperparameters):
        l2_lambda: float = Field(1.0, ge=0, description="weight of the quadratic penalty")

    def make_trainer(self, model, setup):
        return Naive(model=model, optimizer=setup.make_optimizer(model), criterion=setup.criterion,
                     **setup.template_kwargs(extra_plugins=[L2Penalty(self.hp.l2_lambda)]))

from avalanche.training import Naive as AvalancheNaive

from clbench.registry import Strategy, register


@register
class Naive(Strategy):
    """Fine-tuning on each task in turn with no protection (lower bound); Avalanche's Naive."""

    name = "naive"

    def build(self, model, hp, loop):
        return AvalancheNaive(model=model, optimizer=loop.optimizer(model), criterion=loop.criterion,
                              **loop.template_kwargs())

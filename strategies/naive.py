from avalanche.training import Naive as AvalancheNaive

from clbench.registry import Strategy, register


@register
class Naive(Strategy):
    """Fine-tuning on each task in turn with no protection (lower bound); Avalanche's Naive."""

    name = "naive"

    def make_trainer(self, model, setup):
        return AvalancheNaive(model=model, optimizer=setup.make_optimizer(model), criterion=setup.criterion,
                              **setup.template_kwargs())

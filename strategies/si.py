from avalanche.training import SynapticIntelligence
from pydantic import Field

from clbench.registry import Hyperparameters, Strategy, register


@register
class SI(Strategy):
    """Synaptic intelligence (Zenke et al. 2017); Avalanche's SynapticIntelligence."""

    name = "si"

    class Hparams(Hyperparameters):
        si_lambda: float = Field(1.0, ge=0, description="weight of the surrogate-loss penalty (c)")
        eps: float = Field(1e-3, gt=0, description="damping of the importance denominator (xi)")

    def build(self, model, hp, loop):
        return SynapticIntelligence(model=model, optimizer=loop.optimizer(model), criterion=loop.criterion,
                                    si_lambda=hp.si_lambda, eps=hp.eps, **loop.template_kwargs())

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

    def make_trainer(self, model, setup):
        return SynapticIntelligence(model=model, optimizer=setup.make_optimizer(model), criterion=setup.criterion,
                                    si_lambda=self.hp.si_lambda, eps=self.hp.eps, **setup.template_kwargs())

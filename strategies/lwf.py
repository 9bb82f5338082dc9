from avalanche.training import LwF as AvalancheLwF
from pydantic import Field

from clbench.registry import Hyperparameters, Strategy, register


@register
class LwF(Strategy):
    """Learning without forgetting (Li and Hoiem 2017): distillation from the previous
    model on the current data; Avalanche's LwF."""

    name = "lwf"

    class Hparams(Hyperparameters):
        alpha: float = Field(1.0, ge=0, description="weight of the distillation loss")
        temperature: float = Field(2.0, gt=0, description="softmax temperature of the distillation")

    def make_trainer(self, model, setup):
        return AvalancheLwF(model=model, optimizer=setup.make_optimizer(model), criterion=setup.criterion,
                            alpha=self.hp.alpha, temperature=self.hp.temperature, **setup.template_kwargs())

from typing import Literal

from avalanche.training import EWC as AvalancheEWC
from pydantic import Field

from clbench.registry import Hyperparameters, Strategy, register


@register
class EWC(Strategy):
    """Elastic weight consolidation (Kirkpatrick et al. 2017); mode=online is EWC-On
    (Schwarz et al. 2018). Avalanche's EWC."""

    name = "ewc"

    class Hparams(Hyperparameters):
        ewc_lambda: float = Field(1000.0, ge=0, description="weight of the quadratic penalty")
        mode: Literal["separate", "online"] = Field(
            "online", description="online: one running Fisher estimate (EWC-On); separate: one per task")
        decay_factor: float = Field(0.9, gt=0, le=1, description="online mode: decay of the old Fisher (gamma)")

    def make_trainer(self, model, setup):
        return AvalancheEWC(model=model, optimizer=setup.make_optimizer(model), criterion=setup.criterion,
                            ewc_lambda=self.hp.ewc_lambda, mode=self.hp.mode,
                            decay_factor=self.hp.decay_factor if self.hp.mode == "online" else None,
                            **setup.template_kwargs())

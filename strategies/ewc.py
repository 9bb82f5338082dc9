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

    def build(self, model, hp, loop):
        return AvalancheEWC(model=model, optimizer=loop.optimizer(model), criterion=loop.criterion,
                            ewc_lambda=hp.ewc_lambda, mode=hp.mode,
                            decay_factor=hp.decay_factor if hp.mode == "online" else None,
                            **loop.template_kwargs())

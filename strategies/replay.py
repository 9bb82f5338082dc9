from avalanche.training import Replay as AvalancheReplay
from pydantic import Field

from clbench.registry import Hyperparameters, Strategy, register


@register
class Replay(Strategy):
    """Experience replay from an episodic memory of mem_size examples
    shared equally by the tasks seen so far; Avalanche's Replay."""

    name = "replay"

    class Hparams(Hyperparameters):
        mem_size: int = Field(500, gt=0, description="examples stored in total")

    def build(self, model, hp, loop):
        return AvalancheReplay(model=model, optimizer=loop.optimizer(model), criterion=loop.criterion,
                               mem_size=hp.mem_size, **loop.template_kwargs())

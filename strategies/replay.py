from avalanche.training import Replay as AvalancheReplay
from pydantic import Field

from clbench.registry import Hyperparameters, Strategy, register


@register
class Replay(Strategy):
    """Experience replay from an episodic memory of memory_size examples
    shared equally by the tasks seen so far; Avalanche's Replay."""

    name = "replay"

    class Hparams(Hyperparameters):
        memory_size: int = Field(500, gt=0, description="examples stored in total")

    @classmethod
    def stored_examples(cls, hp, scenario):
        return hp.memory_size

    def build(self, model, hp, loop):
        return AvalancheReplay(model=model, optimizer=loop.optimizer(model), criterion=loop.criterion,
                               mem_size=hp.memory_size, **loop.template_kwargs())

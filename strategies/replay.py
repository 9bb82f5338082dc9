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

    def stored_examples(self, scenario):
        return min(self.hp.memory_size, sum(scenario.train_sizes))

    def make_trainer(self, model, setup):
        return AvalancheReplay(model=model, optimizer=setup.make_optimizer(model), criterion=setup.criterion,
                               mem_size=self.hp.memory_size, **setup.template_kwargs())

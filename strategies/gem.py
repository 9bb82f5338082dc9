from avalanche.training import GEM as AvalancheGEM
from pydantic import Field

from clbench.registry import Hyperparameters, Strategy, register


@register
class GEM(Strategy):
    """Gradient episodic memory (Lopez-Paz and Ranzato 2017), one quadratic program per
    step (quadprog); Avalanche's GEM."""

    name = "gem"

    class Hparams(Hyperparameters):
        patterns_per_exp: int = Field(100, gt=0, description="examples stored per task (5 tasks: 500 in total)")
        memory_strength: float = Field(0.5, ge=0, description="margin added to the projected gradient (gamma)")

    @classmethod
    def stored_examples(cls, hp, scenario):
        return hp.patterns_per_exp * scenario.n_tasks

    def build(self, model, hp, loop):
        return AvalancheGEM(model=model, optimizer=loop.optimizer(model), criterion=loop.criterion,
                            patterns_per_exp=hp.patterns_per_exp, memory_strength=hp.memory_strength,
                            **loop.template_kwargs())

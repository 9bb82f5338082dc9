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

    def stored_examples(self, scenario):
        return sum(min(self.hp.patterns_per_exp, size) for size in scenario.train_sizes)

    def make_trainer(self, model, setup):
        return AvalancheGEM(model=model, optimizer=setup.make_optimizer(model), criterion=setup.criterion,
                            patterns_per_exp=self.hp.patterns_per_exp, memory_strength=self.hp.memory_strength,
                            **setup.template_kwargs())

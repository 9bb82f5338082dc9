from avalanche.training import AGEM as AvalancheAGEM
from pydantic import Field

from clbench.registry import Hyperparameters, Strategy, register


@register
class AGEM(Strategy):
    """Averaged gradient episodic memory (Chaudhry et al. 2019); Avalanche's AGEM."""

    name = "agem"

    class Hparams(Hyperparameters):
        patterns_per_exp: int = Field(100, gt=0, description="examples stored per task (5 tasks: 500 in total)")
        sample_size: int = Field(256, gt=0, description="memory examples drawn for each reference gradient")

    def stored_examples(self, scenario):
        return sum(min(self.hp.patterns_per_exp, size) for size in scenario.train_sizes)

    def make_trainer(self, model, setup):
        return AvalancheAGEM(model=model, optimizer=setup.make_optimizer(model), criterion=setup.criterion,
                             patterns_per_exp=self.hp.patterns_per_exp, sample_size=self.hp.sample_size,
                             **setup.template_kwargs())

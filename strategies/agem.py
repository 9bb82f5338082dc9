from avalanche.training import Naive
from avalanche.training.plugins import AGEMPlugin
from pydantic import Field

from clbench.registry import Hyperparameters, Strategy, register


class ResumableAGEMPlugin(AGEMPlugin):
    """Avalanche's A-GEM plugin made picklable for checkpoints: the iterator over the
    memory is a generator, not started between tasks, so it is left out and made anew
    from the memory's data loader on loading."""

    def __getstate__(self):
        return {key: value for key, value in self.__dict__.items() if key != "buffer_dliter"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.buffer_dliter = iter(self.buffer_dataloader) if self.buffer_dataloader is not None else iter([])


@register
class AGEM(Strategy):
    """Averaged gradient episodic memory (Chaudhry et al. 2019); Avalanche's AGEM plugin on
    fine-tuning, as Avalanche's AGEM strategy."""

    name = "agem"

    class Hparams(Hyperparameters):
        patterns_per_exp: int = Field(100, gt=0, description="examples stored per task (5 tasks: 500 in total)")
        sample_size: int = Field(256, gt=0, description="memory examples drawn for each reference gradient")

    def stored_examples(self, scenario):
        return sum(min(self.hp.patterns_per_exp, size) for size in scenario.train_sizes)

    def make_trainer(self, model, setup):
        agem = ResumableAGEMPlugin(self.hp.patterns_per_exp, self.hp.sample_size)
        return Naive(model=model, optimizer=setup.make_optimizer(model), criterion=setup.criterion,
                     **setup.template_kwargs(extra_plugins=[agem]))

from avalanche.training import JointTraining

from clbench.registry import Strategy, register


@register
class Joint(Strategy):
    """Joint training on all tasks seen so far (upper bound); Avalanche's JointTraining.

    Row i of the accuracy matrix is a fresh model trained from scratch on tasks 1..i
    together, so the last row is the usual joint upper bound over all tasks.
    """

    name = "joint"
    retrain_from_scratch = True

    def make_trainer(self, model, setup):
        return JointTraining(model=model, optimizer=setup.make_optimizer(model), criterion=setup.criterion,
                             **setup.template_kwargs())

from functools import partial

from clbench.gated import build_path_model
from clbench.hat import AttentionLayer, HardAttention, HATHparams
from clbench.registry import Strategy, register


@register
class HAT(Strategy):
    """Hard attention to the task (Serra et al., ICML 2018): per-task attention masks on
    every unit and filter; weights used by past tasks receive no gradient. Needs the task
    label at test time.

    Faithful to the reference code (s annealed per batch from 1/s_max to s_max, gradient
    conditioning, embedding-gradient compensation, clamping, regulariser c), with
    these choices for what the paper does not cover:
    - Batch norm (ResNet-18): a channel whose cumulative mask exceeds 0.5 is normalised
      with its stored statistics, which no later task updates; its affine parameters
      are conditioned like the weights.
    - Residual blocks: a projection shortcut shares the second conv's mask; its weight
      gradients are scaled by 1 - the output unit's cumulative mask only.
    - Trained with HAT's own SGD settings (lr, momentum), not the run's optimizer.
    """

    name = "hat"
    settings = ("task",)
    setting_hint = {"class": "HAT chooses its masks by the task label, which the class setting withholds; "
                             "use hat_tc (HAT with ccgn's task classifier)"}
    Hparams = HATHparams

    @classmethod
    def make_model(cls, hp, backbone, width, input_shape, setting, task_classes, n_classes):
        make_layer = partial(AttentionLayer, n_tasks=len(task_classes), s_max=hp.s_max)
        return build_path_model(backbone, width, input_shape, setting, task_classes, n_classes, make_layer)

    def build(self, model, hp, loop):
        kwargs = loop.template_kwargs()
        return HardAttention(model=model, criterion=loop.criterion, hp=hp, **kwargs)

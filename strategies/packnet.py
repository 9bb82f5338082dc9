from avalanche.models import MultiTaskModule
from avalanche.models.packnet import PackNetModel, PackNetPlugin, WeightAndBiasPackNetModule
from avalanche.training import Naive
from pydantic import Field

from clbench.errors import UserError
from clbench.models import MultiHeadNet, build_model
from clbench.registry import Hyperparameters, Strategy, register


@register
class PackNet(Strategy):
    """PackNet (Mallya and Lazebnik, CVPR 2018): after each task, prune the smallest of the
    weights it could change, fine-tune the rest and freeze them; later tasks train only
    the pruned ones, and each task at test sees only its own and earlier tasks' weights.
    Needs the task label at test. Avalanche's PackNetModel and PackNetPlugin.

    Defaults and differences from the paper and its code (github.com/arunmallya/packnet):
    - prune_proportion 0.75: the share of a task's trainable weights pruned per layer, as
      the reference code prunes each added task (0.5 and 0.75 are the paper's settings).
      The last task is not pruned either, as there: nothing follows it.
    - The last post_prune_epochs of each task's --epochs fine-tune after pruning. The
      reference code trains 20 epochs, prunes, then fine-tunes 10 at a tenth of the
      learning rate; here the run's learning rate is kept (Avalanche's plugin) and the
      default split is 1 epoch of fine-tuning, so a run needs --epochs 2 or more (the
      paper preset's 3 epochs give 2 + 1, the reference code's ratio).
    - Biases are trained on the first task only, as in the reference code's defaults.
    - Only the shared backbone is pruned; each task has its own head, trained by that task
      alone (as the paper's per-task classifiers). Batch norm is not supported by
      Avalanche's PackNet, hence no resnet18.
    - Built on Avalanche's Naive template with the PackNetPlugin: Avalanche's own PackNet
      template nests the plugins it is given in a list, where no callback reaches them.
    - Executed MACs and model size are counted as for the dense baselines; the model size
      includes PackNet's per-weight buffers (task index and masks, one byte each).
    """

    name = "packnet"
    settings = ("task",)
    setting_hint = {"class": "PackNet picks each task's weights by its task label, which the class setting withholds"}

    class Hparams(Hyperparameters):
        prune_proportion: float = Field(0.75, gt=0, lt=1, description="share of each task's trainable weights pruned "
                                                                     "(per layer) and left to later tasks")
        post_prune_epochs: int = Field(1, gt=0, description="epochs of each task that fine-tune after pruning "
                                                            "(fewer than --epochs)")

    def check_config(self, cfg):
        if cfg.epochs <= self.hp.post_prune_epochs:
            raise UserError(f"packnet fine-tunes for the last post_prune_epochs ({self.hp.post_prune_epochs}) of each "
                            f"task's epochs, so it needs --epochs above that; got --epochs {cfg.epochs}")
        if cfg.backbone != "small_cnn":
            raise UserError(f"packnet needs the small_cnn backbone (Avalanche's PackNet does not support the batch "
                            f"norm of {cfg.backbone})")

    def make_model(self, spec):
        return PackNetHeads(build_model(spec))

    def make_trainer(self, model, setup):
        tasks = len(model.wrappee.heads)
        packnet = PackNetPlugin(self.hp.post_prune_epochs, [self.hp.prune_proportion] * (tasks - 1) + [0.0])
        return Naive(model=model, optimizer=setup.make_optimizer(model), criterion=setup.criterion,
                     **setup.template_kwargs(extra_plugins=[packnet]))


class PackNetHeads(PackNetModel):
    """clbench's multi-head network under Avalanche's PackNet: the backbone's conv and
    linear layers wrapped as PackNet modules, the heads plain; each task's forward
    activates that task's weights (tasks not learned yet: all trainable ones)."""

    forward = MultiTaskModule.forward  # splits a batch by task, unlike PackNetModel's

    def __init__(self, model: MultiHeadNet):
        super(PackNetModel, self).__init__()  # PackNetModel's would wrap the heads too
        model.features = PackNetModel.wrap(model.features)
        self.wrappee = model
        self.max_class_label = model.max_class_label

    def forward_single_task(self, x, task_label):
        self.activate_task(min(task_label, self.task_count))
        return self.wrappee.forward_single_task(x, task_label)

    def __setstate__(self, state):
        """Gradient hooks are not pickled: register PackNet's, which keep frozen weights
        fixed, again on a model loaded from a checkpoint."""
        super().__setstate__(state)
        for module in self.modules():
            if isinstance(module, WeightAndBiasPackNetModule):
                module.wrappee.weight.register_hook(module._remove_gradient_hook)

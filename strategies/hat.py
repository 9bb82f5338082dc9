from functools import partial
from typing import Literal

import torch
from pydantic import Field

from clbench.attention import AttentionLayer, attention_regulariser, compensate_embedding_gradient
from clbench.path_network import build_path_model
from clbench.path_training import TaskPathTraining
from clbench.registry import OPTIMIZER_OPTIONS, Hyperparameters, Strategy, build_optimizer, register


class HATHparams(Hyperparameters):
    """Defaults of the reference code (github.com/joansj/hat)."""

    s_max: float = Field(400.0, gt=1, description="attention scale at the end of each epoch and at test")
    c: float = Field(0.75, ge=0, description="weight of the attention regulariser")
    clamp: float = Field(6.0, gt=0, description="embeddings are clamped to [-clamp, clamp] after each step")
    cosh_clamp: float = Field(50.0, gt=0, description="s*e is clamped to this in the gradient compensation")
    optimizer: Literal["sgd"] = Field("sgd", description="HAT's own optimiser")
    lr: float = Field(0.05, gt=0, description="SGD learning rate (HAT's own; the run's --lr is not used)")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (HAT's own; the run's --momentum is not used)")
    clipgrad: float = Field(10000.0, gt=0, description="gradient-norm clipping")


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
    own_options = OPTIMIZER_OPTIONS

    def make_model(self, spec):
        return build_path_model(spec, self.attention_layer(spec))

    def attention_layer(self, spec):
        return partial(AttentionLayer, n_tasks=spec.n_tasks, s_max=self.hp.s_max)

    def make_trainer(self, model, setup):
        return HardAttention(model=model, criterion=setup.criterion, hp=self.hp, **setup.template_kwargs())


def annealed_scale(batch: int, batches: int, s_max: float) -> float:
    """s for batch `batch` (0-based) of an epoch of `batches`: from 1/s_max up towards s_max."""
    return 1 / s_max + (s_max - 1 / s_max) * batch / batches


class HardAttention(TaskPathTraining):
    """HAT's training procedure on a `TaskPathNet` of `AttentionLayer`s."""

    def __init__(self, *, model, hp, **kwargs):
        optimizer = build_optimizer("sgd", model.parameters(), hp.lr, hp.momentum)
        super().__init__(model=model, optimizer=optimizer, hp=hp, **kwargs)

    @property
    def layers(self) -> list[AttentionLayer]:
        return self.model.path_layers

    def _before_training_iteration(self, **kwargs):
        self.s = annealed_scale(self.clock.train_epoch_iterations, len(self.dataloader), self.hp.s_max)
        for layer in self.layers:
            layer.s = self.s
        super()._before_training_iteration(**kwargs)

    def criterion(self):
        masks = [layer.attention(self.task, self.s) for layer in self.layers]
        regulariser = attention_regulariser(masks, [layer.cumulative for layer in self.layers])
        return self.task_loss() + self.hp.c * regulariser

    def optimizer_step(self):
        for layer in self.layers:
            layer.condition_gradients()
            weight = layer.embedding.weight
            weight.grad = compensate_embedding_gradient(weight.grad, weight.data, self.s, self.hp.s_max,
                                                        self.hp.cosh_clamp)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.hp.clipgrad)
        super().optimizer_step()
        with torch.no_grad():
            for layer in self.layers:
                layer.embedding.weight.clamp_(-self.hp.clamp, self.hp.clamp)

    @torch.no_grad()
    def protect_task(self):
        """Fold this task's masks (at s_max) into the cumulative ones; record capacity used."""
        self.model.eval()
        sample = self.experience.dataset.eval()[0][0].unsqueeze(0).to(self.device)
        _, trace = self.model.forward_path(sample, self.task)  # every layer's active inputs
        for (name, layer), active_in in zip(self.model.named_path_layers().items(), trace.active_inputs):
            mask = layer.attention(self.task, self.hp.s_max)
            before = layer.cumulative > 0.5
            layer.cumulative = torch.maximum(layer.cumulative, mask)
            layer.cumulative_in = torch.maximum(layer.cumulative_in, active_in[0])
            layer.set_frozen_statistics(layer.cumulative > 0.5)
            self.record_usage(name, mask > 0.5, before, layer.cumulative > 0.5)

"""HAT: hard attention to the task (Serra et al., ICML 2018), on the same per-task-path
backbones as ccgn (`clbench.gated`).

Every layer has one embedding per task; its attention mask is sigmoid(s * e_t) on each
unit or filter. After each task the cumulative mask of the tasks learned so far
protects the weights they use.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from clbench.gated import PathLayer, TaskPathNet
from clbench.registry import Hyperparameters
from clbench.path_training import TaskPathTraining


class HATHparams(Hyperparameters):
    """Defaults of the reference code (github.com/joansj/hat)."""

    s_max: float = Field(400.0, gt=1, description="attention scale at the end of each epoch and at test")
    c: float = Field(0.75, ge=0, description="weight of the attention regulariser")
    clamp: float = Field(6.0, gt=0, description="embeddings are clamped to [-clamp, clamp] after each step")
    cosh_clamp: float = Field(50.0, gt=0, description="s*e is clamped to this in the gradient compensation")
    lr: float = Field(0.05, gt=0, description="SGD learning rate (HAT's own; the run's --lr is not used)")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (HAT's own; the run's --momentum is not used)")
    clipgrad: float = Field(10000.0, gt=0, description="gradient-norm clipping")


class AttentionLayer(PathLayer):
    """HAT's attention: the mask sigmoid(s * e_t) of the layer's output channels, the same
    for every sample. `cumulative` and `cumulative_in` hold the cumulative masks (maximum
    over learned tasks) of the layer's units and of its input units."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, norm: nn.Module | None, tied: nn.Sequential | None = None, *,
                 n_tasks: int, s_max: float):
        super().__init__(layer, norm, tied)
        self.embedding = nn.Embedding(n_tasks, self.out_units)  # N(0, 1), as in the reference code
        self.s_max = self.s = s_max
        self.register_buffer("cumulative", torch.zeros(self.out_units))
        self.register_buffer("cumulative_in", torch.zeros(self.in_units))

    def attention(self, task: int, s: float) -> torch.Tensor:
        return torch.sigmoid(s * self.embedding.weight[task])

    def mask(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.attention(task, self.s if self.training else self.s_max).expand(len(x), -1)

    def condition_gradients(self) -> None:
        """Scale weight gradients by 1 - min(cumulative mask of the unit, of its input unit);
        biases, batch-norm parameters and shortcut weights by 1 - the unit's mask."""
        keep = 1 - self.cumulative
        for parameter in self.kernel_parameters():
            if parameter.grad is None:
                continue
            if parameter is self.layer.weight:
                out_shape = (-1,) + (1,) * (parameter.dim() - 1)
                in_shape = (1, -1) + (1,) * (parameter.dim() - 2)
                used = torch.minimum(self.cumulative.view(out_shape), self.cumulative_in.view(in_shape))
                parameter.grad *= 1 - used
            else:
                parameter.grad *= keep.view((-1,) + (1,) * (parameter.dim() - 1))


def annealed_scale(batch: int, batches: int, s_max: float) -> float:
    """s for batch `batch` (0-based) of an epoch of `batches`: from 1/s_max up towards s_max."""
    return 1 / s_max + (s_max - 1 / s_max) * batch / batches


def compensate_embedding_gradient(grad: torch.Tensor, embedding: torch.Tensor, s: float, s_max: float,
                                  cosh_clamp: float) -> torch.Tensor:
    """The embedding gradient rescaled as if the mask were sigmoid(s_max * e) seen through
    sigmoid(e): multiplied by s_max [cosh(s e) + 1] / (s [cosh(e) + 1])."""
    numerator = torch.cosh(torch.clamp(s * embedding, -cosh_clamp, cosh_clamp)) + 1
    return grad * s_max / s * numerator / (torch.cosh(embedding) + 1)


def attention_regulariser(masks: list[torch.Tensor], previous: list[torch.Tensor]) -> torch.Tensor:
    """sum a_t (1 - a_<t) / sum (1 - a_<t) over all units of all layers; zero when past
    tasks left no free unit."""
    new = sum((m * (1 - p)).sum() for m, p in zip(masks, previous))
    free = sum((1 - p).sum() for p in previous)
    return new / free if free > 0 else torch.zeros(())


class HardAttention(TaskPathTraining):
    """Training procedure of HAT on a `TaskPathNet` of `AttentionLayer`s."""

    def __init__(self, *, model: TaskPathNet, hp, **kwargs):
        optimizer = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum)
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
        self.model.forward_single_task(sample, self.task)  # records every layer's input mask
        for name, layer in self.model.named_path_layers().items():
            mask = layer.attention(self.task, self.hp.s_max)
            before = layer.cumulative > 0.5
            layer.cumulative = torch.maximum(layer.cumulative, mask)
            layer.cumulative_in = torch.maximum(layer.cumulative_in, layer.in_mask[0])
            layer.set_frozen_statistics(layer.cumulative > 0.5)
            self.record_usage(name, mask > 0.5, before, layer.cumulative > 0.5)

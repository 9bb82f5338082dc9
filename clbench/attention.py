"""HAT's attention (Serra et al., ICML 2018): one embedding per task and layer, whose
mask sigmoid(s * e_t) gates each unit or filter; the cumulative mask of the tasks
learned so far says which weights they use. With the gradient rules that protect those
weights and train the embeddings.

The procedure (annealing s, when to fold a task into the cumulative masks) is in
`clbench.strategies.hat`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from clbench.path_network import PathLayer, PathTrace


class AttentionLayer(PathLayer):
    """The mask sigmoid(s * e_t) of the layer's output channels, the same for every
    sample; s is set by the training procedure and is s_max at test. `cumulative` and
    `cumulative_in` hold the cumulative masks (maximum over learned tasks) of the layer's
    units and of its input units."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, norm: nn.Module | None, tied: nn.Sequential | None = None, *,
                 n_tasks: int, s_max: float):
        super().__init__(layer, norm, tied)
        self.embedding = nn.Embedding(n_tasks, self.out_units)  # N(0, 1), as in the reference code
        self.s_max = self.s = s_max
        self.register_buffer("cumulative", torch.zeros(self.out_units))
        self.register_buffer("cumulative_in", torch.zeros(self.in_units))

    def attention(self, task: int | list[int], s: float) -> torch.Tensor:
        return torch.sigmoid(s * self.embedding.weight[task])

    def mask(self, x: torch.Tensor, task: int, trace: PathTrace) -> torch.Tensor:
        return self.attention(task, self.s if self.training else self.s_max).expand(len(x), -1)

    def kept_channels(self, task: int) -> torch.Tensor:
        return self.attention(task, self.s_max) > 0

    def compact_mask(self, tasks: tuple[int, ...], kept_in: torch.Tensor, kept_out: torch.Tensor) -> Callable:
        # Not exactly binary: sigmoid(s_max e) is fractional where s_max |e| is small.
        values = self.attention(list(tasks), self.s_max).detach()[:, kept_out]  # 0 on a task's channels not kept
        return lambda x: values.repeat_interleave(len(x) // len(tasks), 0)

    def mask_modules(self, task: int) -> list[nn.Module]:
        return [self.embedding]

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

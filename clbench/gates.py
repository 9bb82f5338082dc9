"""ccgn's gates (Abati et al., CVPR 2020): a small gating module per task and layer
decides, for each sample, which of the layer's kernels run.

The module only says how to gate, freeze and re-initialise; when to do so is the
procedure of `clbench.strategies.ccgn`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clbench.compact import folded
from clbench.path_network import FreezableBatchNorm2d, PathLayer, PathTrace, positions_mean, raw_tensor

GATE_HIDDEN = 16


def gumbel_sigmoid_straight_through(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hard 0/1 gates forward; gradients of the relaxed sigmoid(logits + logistic noise) / T."""
    uniform = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(uniform) - torch.log1p(-uniform)) / temperature)
    hard = (soft > 0.5).to(logits.dtype)
    return soft + (hard - soft).detach()


class GatedLayer(PathLayer):
    """Gating module of task t: global average pool of the layer input -> linear (16) ->
    batch norm -> ReLU -> linear -> one logit per output channel. Training: Gumbel
    straight-through samples; evaluation: the gate is open where the logit is positive,
    restricted to the kernels task t used when it was learned (`allowed`)."""

    masks_per_sample = True

    def __init__(self, layer: nn.Conv2d | nn.Linear, norm: nn.Module | None, tied: nn.Sequential | None = None, *,
                 n_tasks: int, temperature: float, closed_gates_learn: bool = False):
        super().__init__(layer, norm, tied)
        self.temperature, self.closed_gates_learn = temperature, closed_gates_learn
        self.gates = nn.ModuleList(
            nn.Sequential(nn.Linear(self.in_units, GATE_HIDDEN), nn.BatchNorm1d(GATE_HIDDEN), nn.ReLU(),
                          nn.Linear(GATE_HIDDEN, self.out_units))
            for _ in range(n_tasks))
        self.mask_macs = GATE_HIDDEN * (self.in_units + self.out_units)
        # allowed[t]: kernels task t may open; all of them until task t is learned.
        self.register_buffer("allowed", torch.ones(n_tasks, self.out_units, dtype=torch.bool))
        self.register_buffer("frozen", torch.zeros(self.out_units, dtype=torch.bool))
        for module in self.kernel_modules():
            if isinstance(module, FreezableBatchNorm2d):
                module.frozen_channels_learn = False  # their gradients are zeroed (`mask_frozen_gradients`)

    def mask(self, x: torch.Tensor, task: int, trace: PathTrace) -> torch.Tensor:
        """Training also records sigmoid(logits), each gate's probability of opening before
        the logistic noise, in `trace.probabilities` (batch-shaping's input)."""
        logits = self.gates[task](positions_mean(x))
        if self.training:
            trace.probabilities.append(torch.sigmoid(logits))
            return gumbel_sigmoid_straight_through(logits, self.temperature)
        return ((logits > 0) & self.allowed[task]).to(logits.dtype)

    def kept_channels(self, task: int) -> torch.Tensor:
        return self.allowed[task]

    def compact_mask(self, tasks: tuple[int, ...], kept_in: torch.Tensor, kept_out: torch.Tensor) -> CompactGate:
        allowed = self.allowed[list(tasks)][:, kept_out]
        return CompactGate([self.gates[task] for task in tasks], allowed, kept_in, kept_out)

    def mask_modules(self, task: int) -> list[nn.Module]:
        return [self, *self.gates[task].modules()]  # self: `allowed`

    def mask_frozen_gradients(self) -> None:
        frozen = self.frozen.nonzero().flatten()  # once, not once per parameter as a boolean index would
        for parameter in self.kernel_parameters():
            if parameter.grad is not None:
                parameter.grad.index_fill_(0, frozen, 0)

    def freeze(self, task: int, used: torch.Tensor) -> None:
        """Task `task` is learned: its gates may only open `used` kernels, which are frozen."""
        self.allowed[task] = used
        self.frozen |= used
        self.set_frozen_statistics(self.frozen)
        self.gates[task].requires_grad_(False)

    @torch.no_grad()
    def reinitialise_free_kernels(self) -> None:
        """Give the kernels no learned task uses a fresh default initialisation."""
        free = ~self.frozen
        for module in self.kernel_modules():
            fresh = type(module)(*_constructor_args(module))
            for name, value in list(fresh.named_parameters()) + list(fresh.named_buffers()):
                current = raw_tensor(module, name)
                if current.dim() > 0 and len(current) == len(free):
                    current[free] = value[free].to(current.device)


class CompactGate:
    """Tasks' gating modules at test, on a batch of one equal chunk per task (chunk k
    through the k-th module), stacked into one batched matrix product per layer. They read
    only the kept input channels (the others are exactly zero, so their pooled value is
    too) and decide only the kept kernels, closed where the chunk's task may not open
    them (`allowed`); each batch norm folded into its module's first layer."""

    def __init__(self, gates: list[nn.Sequential], allowed: torch.Tensor, kept_in: torch.Tensor,
                 kept_out: torch.Tensor):
        firsts = [folded(first.weight.detach().index_select(1, kept_in), first.bias.detach(), norm, slice(None))
                  for first, norm, _, _ in gates]
        self.first = torch.stack([w.t() for w, _ in firsts]), torch.stack([b for _, b in firsts])[:, None]
        lasts = [gate[-1] for gate in gates]
        # A kernel the task may not open gets a bias of -inf: its logit is -inf (or NaN), never above 0.
        biases = torch.stack([last.bias.detach()[kept_out] for last in lasts]).masked_fill(~allowed, -torch.inf)
        self.last = torch.stack([last.weight.detach()[kept_out].t() for last in lasts]), biases[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pooled = positions_mean(x)
        weight, bias = self.first
        hidden = F.relu(torch.baddbmm(bias, pooled.view(len(weight), -1, pooled.shape[1]), weight))
        gates = torch.baddbmm(self.last[1], hidden, self.last[0]) > 0
        return gates.flatten(0, 1).to(x.dtype)


def _constructor_args(module: nn.Module) -> tuple:
    if isinstance(module, nn.Conv2d):
        return (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.bias is not None)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    return (module.num_features,)

"""Conditional channel gating (Abati et al., CVPR 2020): every layer's output channels
are switched on or off per sample by a small gating module of the task in hand.

A `GatedLayer` holds one gating module per task. Kernels (output channels) that a
learned task used are frozen: the strategy zeroes their gradients and
`FreezableBatchNorm2d` keeps their running statistics. Each forward pass also counts
the multiply-accumulates it actually executed, from the gate decisions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from avalanche.models import MultiTaskModule
from torch import nn

from clbench.errors import UserError

GATE_HIDDEN = 16
CLASSIFIER_HIDDEN = 64
# Class setting: scores of tasks the task classifier did not pick are lowered by this much
# (see GatedNet.forward).
OFF_TASK_PENALTY = 1e4


def gumbel_sigmoid_straight_through(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hard 0/1 gates forward; gradients of the relaxed sigmoid(logits + logistic noise) / T."""
    uniform = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(uniform) - torch.log1p(-uniform)) / temperature)
    hard = (soft > 0.5).to(logits.dtype)
    return soft + (hard - soft).detach()


class FreezableBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose `frozen` channels behave as in evaluation even while training:
    normalised with their stored statistics, which are never updated."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.register_buffer("frozen", torch.zeros(channels, dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.frozen.any():
            return super().forward(x)
        mean, var = self.running_mean.clone(), self.running_var.clone()
        trained = F.batch_norm(x, mean, var, self.weight, self.bias, True, self.momentum, self.eps)
        kept = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        # New tensors, not in-place writes: `kept` needs the old ones for its backward pass.
        self.running_mean = torch.where(self.frozen, self.running_mean, mean)
        self.running_var = torch.where(self.frozen, self.running_var, var)
        return torch.where(self.frozen[None, :, None, None], kept, trained)


class GatedLayer(nn.Module):
    """A conv or linear layer (with optional batch norm) gated per output channel.

    Gating module of task t: global average pool of the layer input -> linear (16) ->
    batch norm -> ReLU -> linear -> one logit per output channel. Training: Gumbel
    straight-through samples; evaluation: the gate is open where the logit is positive,
    restricted to the kernels task t used when it was learned (`allowed`). `tied` layers
    (a ResNet shortcut) share this layer's gates and are frozen with it.
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, norm: nn.Module | None, n_tasks: int,
                 temperature: float, tied: nn.Sequential | None = None):
        super().__init__()
        self.layer, self.norm, self.tied = layer, norm, tied
        self.temperature = temperature
        self.in_units = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
        self.out_units = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        self.gates = nn.ModuleList(
            nn.Sequential(nn.Linear(self.in_units, GATE_HIDDEN), nn.BatchNorm1d(GATE_HIDDEN), nn.ReLU(),
                          nn.Linear(GATE_HIDDEN, self.out_units))
            for _ in range(n_tasks))
        # allowed[t]: kernels task t may open; all of them until task t is learned.
        self.register_buffer("allowed", torch.ones(n_tasks, self.out_units, dtype=torch.bool))
        self.register_buffer("frozen", torch.zeros(self.out_units, dtype=torch.bool))
        self.force_open = False

    def gate(self, x: torch.Tensor, task: int) -> torch.Tensor:
        logits = self.gates[task](x.mean((2, 3)) if x.dim() == 4 else x)
        if self.force_open:
            return torch.ones_like(logits)
        if self.training:
            return gumbel_sigmoid_straight_through(logits, self.temperature)
        return ((logits > 0) & self.allowed[task]).to(logits.dtype)

    def forward(self, x: torch.Tensor, task: int, in_active: torch.Tensor):
        """Gated output, the gates (batch x channels) and the MACs executed per sample,
        given `in_active`, the number of non-zero input units of each sample."""
        gates = self.gate(x, task)
        out = self.layer(x)
        if self.norm is not None:
            out = self.norm(out)
        spatial = out.shape[2] * out.shape[3] if out.dim() == 4 else 1
        kernel = self.layer.weight[0].numel() // self.in_units
        macs = in_active * gates.detach().sum(1) * kernel * spatial + GATE_HIDDEN * (self.in_units + self.out_units)
        return out * gates.view(*gates.shape, *[1] * (out.dim() - 2)), gates, macs

    def kernel_parameters(self) -> list[torch.Tensor]:
        """Every parameter whose first dimension indexes this layer's kernels."""
        modules = [self.layer, self.norm] + (list(self.tied) if self.tied is not None else [])
        return [p for m in modules if m is not None for p in m.parameters(recurse=False)]

    def mask_frozen_gradients(self) -> None:
        for parameter in self.kernel_parameters():
            if parameter.grad is not None:
                parameter.grad[self.frozen] = 0

    def freeze(self, task: int, used: torch.Tensor) -> None:
        """Task `task` is learned: its gates may only open `used` kernels, which are frozen."""
        self.allowed[task] = used
        self.frozen |= used
        for module in [self.norm] + (list(self.tied) if self.tied is not None else []):
            if isinstance(module, FreezableBatchNorm2d):
                module.frozen.copy_(self.frozen)
        self.gates[task].requires_grad_(False)

    @torch.no_grad()
    def reinitialise_free_kernels(self) -> None:
        """Give the kernels no learned task uses a fresh default initialisation."""
        free = ~self.frozen
        modules = [self.layer, self.norm] + (list(self.tied) if self.tied is not None else [])
        for module in modules:
            if module is None:
                continue
            fresh = type(module)(*_constructor_args(module))
            for name, value in list(fresh.named_parameters()) + list(fresh.named_buffers()):
                current = getattr(module, name)
                if current.dim() > 0 and len(current) == len(free):
                    current[free] = value[free].to(current.device)


def _constructor_args(module: nn.Module) -> tuple:
    if isinstance(module, nn.Conv2d):
        return (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.bias is not None)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    return (module.num_features,)


class GatedSmallCNN(nn.Module):
    """`clbench.models.SmallCNN` with gates on both conv layers and the fully connected
    layer (whose gating module sees the flattened feature map)."""

    def __init__(self, in_channels: int, width: int, n_tasks: int, temperature: float, input_size: int = 28):
        super().__init__()
        self.in_channels, self.out_features = in_channels, 4 * width
        self.spatial_after_convs = (input_size // 4) ** 2
        self.layers = nn.ModuleList([
            GatedLayer(nn.Conv2d(in_channels, width, 3, padding=1), None, n_tasks, temperature),
            GatedLayer(nn.Conv2d(width, width, 3, padding=1), None, n_tasks, temperature),
            GatedLayer(nn.Linear(width * self.spatial_after_convs, self.out_features), None, n_tasks, temperature),
        ])

    def forward(self, x: torch.Tensor, task: int):
        """Features, gates of every layer, executed MACs per sample."""
        active = torch.full((len(x),), float(self.in_channels), device=x.device)
        all_gates, total = [], 0
        for index, layer in enumerate(self.layers):
            if index == 2:
                x = x.flatten(1)
                active = active * self.spatial_after_convs
            x, gates, macs = layer(x, task, active)
            x = F.relu(x)
            if index < 2:
                x = F.max_pool2d(x, 2)
            active = gates.detach().sum(1)
            all_gates.append(gates)
            total = total + macs
        return x, all_gates, total


class GatedBasicBlock(nn.Module):
    """ResNet basic block with both convs gated; a projection shortcut shares the second
    conv's gates (its kernels are frozen with them)."""

    def __init__(self, in_channels: int, channels: int, stride: int, n_tasks: int, temperature: float):
        super().__init__()
        self.conv1 = GatedLayer(nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False),
                                FreezableBatchNorm2d(channels), n_tasks, temperature)
        shortcut = None
        if stride != 1 or in_channels != channels:
            shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                     FreezableBatchNorm2d(channels))
        self.conv2 = GatedLayer(nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                FreezableBatchNorm2d(channels), n_tasks, temperature, tied=shortcut)

    def forward(self, x: torch.Tensor, task: int, active_in: torch.Tensor):
        """`active_in`: which input channels of each sample are non-zero (batch x channels)."""
        h, gates1, macs = self.conv1(x, task, active_in.sum(1))
        out, gates2, macs2 = self.conv2(F.relu(h), task, gates1.detach().sum(1))
        open2 = gates2.detach()
        if self.conv2.tied is None:
            shortcut, active_out = x, torch.maximum(open2, active_in)
        else:
            shortcut = self.conv2.tied(x) * gates2[:, :, None, None]
            macs2 = macs2 + active_in.sum(1) * open2.sum(1) * out.shape[2] * out.shape[3]
            active_out = open2
        return F.relu(out + shortcut), [gates1, gates2], macs + macs2, active_out


class GatedResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool) for 32x32 inputs;
    `width` channels in the first stage (64 in the standard network)."""

    def __init__(self, in_channels: int, width: int, n_tasks: int, temperature: float):
        super().__init__()
        self.in_channels, self.out_features = in_channels, 8 * width
        self.stem = GatedLayer(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), FreezableBatchNorm2d(width),
                               n_tasks, temperature)
        blocks, channels = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out = width * 2**stage
            blocks += [GatedBasicBlock(channels, out, stride, n_tasks, temperature),
                       GatedBasicBlock(out, out, 1, n_tasks, temperature)]
            channels = out
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, task: int):
        x, gates, macs = self.stem(x, task, torch.full((len(x),), float(self.in_channels), device=x.device))
        x, all_gates, active = F.relu(x), [gates], gates.detach()
        for block in self.blocks:
            x, gates, block_macs, active = block(x, task, active)
            all_gates += gates
            macs = macs + block_macs
        return x.mean((2, 3)), all_gates, macs


GATED_BACKBONES = {"small_cnn": GatedSmallCNN, "resnet18": GatedResNet18}


class GatedNet(MultiTaskModule):
    """A gated backbone with one head per task; in the class setting also the task
    classifier that picks which task's path and head to trust.

    After every forward pass `executed_macs` holds the MACs each sample cost and
    `last_gates` the gates of every layer (for the sparsity loss).
    """

    def __init__(self, backbone: nn.Module, task_classes: list[list[int]], n_classes: int, setting: str):
        super().__init__()
        self.backbone, self.setting, self.n_classes = backbone, setting, n_classes
        self.task_classes = task_classes
        self.heads = nn.ModuleList(nn.Linear(backbone.out_features, len(c)) for c in task_classes)
        self.max_class_label = max(len(c) for c in task_classes)
        self.tasks_learned = 0
        if setting == "class":
            n_tasks = len(task_classes)
            self.task_classifier = nn.Sequential(nn.Linear(n_tasks * backbone.out_features, CLASSIFIER_HIDDEN),
                                                 nn.ReLU(), nn.Linear(CLASSIFIER_HIDDEN, n_tasks))

    @property
    def gated_layers(self) -> list[GatedLayer]:
        return [m for m in self.backbone.modules() if isinstance(m, GatedLayer)]

    def forward_single_task(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """The path and head of one task (task setting; training in both settings)."""
        features, self.last_gates, macs = self.backbone(x, task)
        head = self.heads[task]
        self.executed_macs = macs + head.in_features * head.out_features
        return head(features)

    def path_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Features of every learned task's path (at least one) and their total MACs."""
        features, total = [], 0
        for task in range(max(self.tasks_learned, 1)):
            f, _, macs = self.backbone(x, task)
            features.append(f)
            total = total + macs
        return features, total

    def classify_task(self, features: torch.Tensor) -> torch.Tensor:
        """Task-classifier logits over the learned tasks, from their paths' features
        concatenated; paths not learned yet enter as zeros."""
        learned = features.shape[1] // self.backbone.out_features
        padding = self.task_classifier[0].in_features - features.shape[1]
        return self.task_classifier(F.pad(features, (0, padding)))[:, :learned]

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor) -> torch.Tensor:
        if self.setting == "task":
            return super().forward(x, task_labels)
        # Class setting: the task label is not used. Scores over all classes: each task's
        # classes get its own head's log-softmax, lowered by OFF_TASK_PENALTY unless the
        # task classifier picked that task. The argmax is thus the picked head's choice,
        # and restricting the scores to one task's classes gives that task's head (the
        # oracle prediction); classes of tasks not learned yet score -inf.
        features, macs = self.path_features(x)
        task_logits = self.classify_task(torch.cat(features, 1))
        picked = task_logits.argmax(1)
        scores = torch.full((len(x), self.n_classes), -torch.inf, device=x.device)
        for task, f in enumerate(features):
            head = self.heads[task]
            penalty = OFF_TASK_PENALTY * (picked != task).to(x.dtype)
            scores[:, self.task_classes[task]] = F.log_softmax(head(f), 1) - penalty[:, None]
            macs = macs + head.in_features * head.out_features
        layers = [m for m in self.task_classifier if isinstance(m, nn.Linear)]
        self.executed_macs = macs + sum(layer.in_features * layer.out_features for layer in layers)
        return scores


def build_gated_model(backbone: str, width: int, in_channels: int, setting: str, task_classes: list[list[int]],
                      n_classes: int, temperature: float) -> GatedNet:
    if backbone not in GATED_BACKBONES:
        raise UserError(f"no gated version of backbone {backbone!r}; choose one of: {', '.join(GATED_BACKBONES)}")
    network = GATED_BACKBONES[backbone](in_channels, width, len(task_classes), temperature)
    return GatedNet(network, task_classes, n_classes, setting)

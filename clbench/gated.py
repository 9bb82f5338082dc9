"""Networks with one path per task: every layer's output channels are multiplied by a
mask of the task in hand. ccgn (Abati et al., CVPR 2020) computes the mask per sample
with a small gating module (`GatedLayer`); HAT (`clbench.hat`) learns one per task.

The backbones (small CNN, ResNet-18) take the masked-layer class as an argument, so both
methods run on the same networks. Kernels (output channels) a learned task relies on
are protected by the strategy; `FreezableBatchNorm2d` keeps their running statistics.
Each forward pass also counts the multiply-accumulates it actually executed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from avalanche.models import MultiTaskModule
from torch import nn

from clbench.errors import UserError

GATE_HIDDEN = 16
CLASSIFIER_HIDDEN = 64
# Class setting: scores of tasks the task classifier did not pick are lowered by this much
# (see TaskPathNet.forward).
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


def masked_macs(in_mask: torch.Tensor, out_mask: torch.Tensor, per_pair: int) -> torch.Tensor:
    """MACs per sample of a layer whose inputs and outputs below a mask of one half are
    skipped: active inputs x active outputs x MACs per input-output pair."""
    return (in_mask.detach() > 0.5).sum(1) * (out_mask.detach() > 0.5).sum(1) * per_pair


class PathLayer(nn.Module):
    """A conv or linear layer (with optional batch norm) whose output channels are
    multiplied by a per-task, per-sample mask from `mask(x, task)`: ccgn's gates or HAT's
    attention. `tied` layers (a ResNet projection shortcut) share the mask and go with
    the layer's kernels when they are frozen or protected.

    The forward pass also returns the MACs executed per sample: a channel whose mask is
    below one half counts as skipped, on the output side and as the next layer's input.
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, norm: nn.Module | None, tied: nn.Sequential | None = None):
        super().__init__()
        self.layer, self.norm, self.tied = layer, norm, tied
        self.in_units = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
        self.out_units = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        self.force_open = False

    def mask(self, x: torch.Tensor, task: int) -> torch.Tensor:
        raise NotImplementedError

    mask_macs = 0  # MACs of computing the mask for one sample

    def forward(self, x: torch.Tensor, task: int, in_mask: torch.Tensor):
        """Masked output, the mask (batch x channels) and the MACs executed per sample,
        given `in_mask`, which input units of each sample are active (batch x units)."""
        mask = self.mask(x, task)
        if self.force_open:
            mask = torch.ones_like(mask)
        out = self.layer(x)
        if self.norm is not None:
            out = self.norm(out)
        self.in_mask = in_mask.detach()
        spatial = out.shape[2] * out.shape[3] if out.dim() == 4 else 1
        kernel = self.layer.weight[0].numel() // self.in_units
        macs = masked_macs(in_mask, mask, kernel * spatial) + self.mask_macs
        return out * mask.view(*mask.shape, *[1] * (out.dim() - 2)), mask, macs

    def kernel_modules(self) -> list[nn.Module]:
        return [m for m in [self.layer, self.norm] + list(self.tied or []) if m is not None]

    def kernel_parameters(self) -> list[torch.Tensor]:
        """Every parameter whose first dimension indexes this layer's kernels."""
        return [p for m in self.kernel_modules() for p in m.parameters(recurse=False)]

    def set_frozen_statistics(self, frozen: torch.Tensor) -> None:
        for module in self.kernel_modules():
            if isinstance(module, FreezableBatchNorm2d):
                module.frozen.copy_(frozen)


class GatedLayer(PathLayer):
    """ccgn's gates. Gating module of task t: global average pool of the layer input ->
    linear (16) -> batch norm -> ReLU -> linear -> one logit per output channel.
    Training: Gumbel straight-through samples; evaluation: the gate is open where the
    logit is positive, restricted to the kernels task t used when it was learned
    (`allowed`)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, norm: nn.Module | None, tied: nn.Sequential | None = None, *,
                 n_tasks: int, temperature: float):
        super().__init__(layer, norm, tied)
        self.temperature = temperature
        self.gates = nn.ModuleList(
            nn.Sequential(nn.Linear(self.in_units, GATE_HIDDEN), nn.BatchNorm1d(GATE_HIDDEN), nn.ReLU(),
                          nn.Linear(GATE_HIDDEN, self.out_units))
            for _ in range(n_tasks))
        self.mask_macs = GATE_HIDDEN * (self.in_units + self.out_units)
        # allowed[t]: kernels task t may open; all of them until task t is learned.
        self.register_buffer("allowed", torch.ones(n_tasks, self.out_units, dtype=torch.bool))
        self.register_buffer("frozen", torch.zeros(self.out_units, dtype=torch.bool))

    def mask(self, x: torch.Tensor, task: int) -> torch.Tensor:
        logits = self.gates[task](x.mean((2, 3)) if x.dim() == 4 else x)
        if self.training:
            return gumbel_sigmoid_straight_through(logits, self.temperature)
        return ((logits > 0) & self.allowed[task]).to(logits.dtype)

    def mask_frozen_gradients(self) -> None:
        for parameter in self.kernel_parameters():
            if parameter.grad is not None:
                parameter.grad[self.frozen] = 0

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


class PathSmallCNN(nn.Module):
    """`clbench.models.SmallCNN` with masked output channels on both conv layers and
    units on the fully connected layer. `make_layer(layer, norm, tied=None)` builds the
    masked layers (ccgn gates or HAT attention)."""

    def __init__(self, in_channels: int, width: int, input_size: int, make_layer: Callable):
        super().__init__()
        self.in_channels, self.out_features = in_channels, 4 * width
        self.spatial_after_convs = (input_size // 4) ** 2
        self.layers = nn.ModuleList([
            make_layer(nn.Conv2d(in_channels, width, 3, padding=1), None),
            make_layer(nn.Conv2d(width, width, 3, padding=1), None),
            make_layer(nn.Linear(width * self.spatial_after_convs, self.out_features), None),
        ])

    def forward(self, x: torch.Tensor, task: int):
        """Features, masks of every layer, executed MACs per sample."""
        active = torch.ones(len(x), self.in_channels, device=x.device)
        masks, total = [], 0
        for index, layer in enumerate(self.layers):
            if index == 2:
                x = x.flatten(1)
                active = active.repeat_interleave(self.spatial_after_convs, 1)
            x, mask, macs = layer(x, task, active)
            x = F.relu(x)
            if index < 2:
                x = F.max_pool2d(x, 2)
            active = mask.detach()
            masks.append(mask)
            total = total + macs
        return x, masks, total


class PathBasicBlock(nn.Module):
    """ResNet basic block with both convs masked; a projection shortcut shares the second
    conv's mask. With an identity shortcut a channel is active where either the second
    conv's mask or the input is."""

    def __init__(self, in_channels: int, channels: int, stride: int, make_layer: Callable):
        super().__init__()
        self.conv1 = make_layer(nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False),
                                FreezableBatchNorm2d(channels))
        shortcut = None
        if stride != 1 or in_channels != channels:
            shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                     FreezableBatchNorm2d(channels))
        self.conv2 = make_layer(nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                FreezableBatchNorm2d(channels), shortcut)

    def forward(self, x: torch.Tensor, task: int, active_in: torch.Tensor):
        h, mask1, macs = self.conv1(x, task, active_in)
        out, mask2, macs2 = self.conv2(F.relu(h), task, mask1.detach())
        if self.conv2.tied is None:
            shortcut, active_out = x, torch.maximum(mask2.detach(), active_in)
        else:
            shortcut = self.conv2.tied(x) * mask2[:, :, None, None]
            macs2 = macs2 + masked_macs(active_in, mask2, out.shape[2] * out.shape[3])
            active_out = mask2.detach()
        return F.relu(out + shortcut), [mask1, mask2], macs + macs2, active_out


class PathResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool) for 32x32 inputs;
    `width` channels in the first stage (64 in the standard network)."""

    def __init__(self, in_channels: int, width: int, input_size: int, make_layer: Callable):
        super().__init__()
        self.in_channels, self.out_features = in_channels, 8 * width
        self.stem = make_layer(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), FreezableBatchNorm2d(width))
        blocks, channels = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out = width * 2**stage
            blocks += [PathBasicBlock(channels, out, stride, make_layer), PathBasicBlock(out, out, 1, make_layer)]
            channels = out
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, task: int):
        active = torch.ones(len(x), self.in_channels, device=x.device)
        x, mask, macs = self.stem(x, task, active)
        x, masks, active = F.relu(x), [mask], mask.detach()
        for block in self.blocks:
            x, block_masks, block_macs, active = block(x, task, active)
            masks += block_masks
            macs = macs + block_macs
        return x.mean((2, 3)), masks, macs


PATH_BACKBONES = {"small_cnn": PathSmallCNN, "resnet18": PathResNet18}


class TaskPathNet(MultiTaskModule):
    """A backbone of `PathLayer`s, whose masks give every task its own path, with one head
    per task; in the class setting also the task classifier that picks which task's path
    and head to trust.

    After every forward pass `executed_macs` holds the MACs each sample cost and
    `last_masks` the masks of every layer (for the sparsity or attention loss).
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
    def path_layers(self) -> list[PathLayer]:
        return list(self.named_path_layers().values())

    def named_path_layers(self) -> dict[str, PathLayer]:
        """The masked layers in forward order, named by their place in the backbone."""
        return {name: m for name, m in self.backbone.named_modules() if isinstance(m, PathLayer)}

    def forward_single_task(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """The path and head of one task (task setting; training in both settings)."""
        features, self.last_masks, macs = self.backbone(x, task)
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


def build_path_model(backbone: str, width: int, input_shape: tuple[int, int, int], setting: str,
                     task_classes: list[list[int]], n_classes: int, make_layer: Callable) -> TaskPathNet:
    if backbone not in PATH_BACKBONES:
        raise UserError(f"backbone {backbone!r} has no per-task-path version; choose one of: {', '.join(PATH_BACKBONES)}")
    network = PATH_BACKBONES[backbone](input_shape[0], width, input_shape[1], make_layer)
    return TaskPathNet(network, task_classes, n_classes, setting)

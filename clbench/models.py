"""Backbones and heads. Task setting: one head per task (multi-head); class setting:
one head over all classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from avalanche.models import MultiTaskModule
from torch import nn
from torch.nn.utils import parametrize

from clbench.errors import UserError


class TaskClasses:
    """The counts of anything that holds `task_classes`, the original class ids of each
    task (a scenario, a model's spec)."""

    task_classes: list[list[int]]

    @property
    def n_tasks(self) -> int:
        return len(self.task_classes)

    @property
    def n_classes(self) -> int:
        return sum(len(classes) for classes in self.task_classes)


@dataclass(frozen=True)
class ModelSpec(TaskClasses):
    """What a strategy's `make_model` builds a network for: the backbone and the
    scenario's input and tasks."""

    backbone: str  # a key of BACKBONES
    width: int  # channels of the (first) conv layers
    input_shape: tuple[int, int, int]  # channels, height, width
    setting: str  # "task" or "class"
    task_classes: list[list[int]]  # original class ids of each task


def channels_last(images: torch.Tensor) -> torch.Tensor:
    """`images` in the channels-last layout, and so every conv and pooling output after
    them: on a CPU they run 1.2-2x faster in it (`benchmarks/train_overhead.py`). Every
    backbone, gated or not, starts with it, so it applies to every strategy alike; weights
    keep their layout, so gradients stay contiguous (A-GEM's plugin views them flat).
    `.to` rather than `.contiguous`: a one-channel batch is both layouts at once, and only
    `.to` gives it channels-last strides that the first conv follows."""
    return images.to(memory_format=torch.channels_last)


# PyTorch 2.15's oneDNN weight gradient of a 1x1 stride-2 convolution corrupts the heap
# (the process aborts) when its channels-last input has fewer than 8 channels: a ResNet-18
# narrower than this, whose projection shortcuts read `width` channels, keeps PyTorch's
# default layout.
RESNET_CHANNELS_LAST_MIN_WIDTH = 8


def resnet_layout(images: torch.Tensor, width: int) -> torch.Tensor:
    return channels_last(images) if width >= RESNET_CHANNELS_LAST_MIN_WIDTH else images


@runtime_checkable
class CountsExecutedMacs(Protocol):
    """A model whose compute depends on its input (gated networks) returns the
    multiply-accumulates each sample executed; for other models the dense count applies."""

    def forward_with_macs(self, x: torch.Tensor, task_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class SmallCNN(nn.Module):
    """Two 3x3 conv layers (2x2 max-pool and ReLU after each) and a fully connected layer
    of `4 * width` units: a small CNN for 28x28 inputs that trains in seconds on a CPU.
    The ReLU follows the pooling: the same values and gradients as before it (the largest
    of four values, activated, is the largest of the four activated), on a quarter of the
    values (`benchmarks/pool_before_relu.py`).

    No batch norm: its running statistics drift with every new task and would charge the
    baselines with forgetting that is not in their weights."""

    def __init__(self, in_channels: int = 1, width: int = 32, input_size: int = 28):
        super().__init__()
        self.out_features = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
            nn.Flatten(), nn.Linear(width * (input_size // 4) ** 2, self.out_features), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(channels_last(x))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool) for 32x32 inputs;
    `width` channels in the first stage (64 in the standard network, less to fit a CPU).
    With batch norm, as usual: baselines that share it across tasks also drift in its
    running statistics."""

    def __init__(self, in_channels: int = 3, width: int = 64, input_size: int = 32):
        super().__init__()
        self.out_features = 8 * width
        layers = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out = width * 2**stage
            layers += [BasicBlock(channels, out, stride), BasicBlock(out, out, 1)]
            channels = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(resnet_layout(x, self.body[0].out_channels))


BACKBONES = {"small_cnn": SmallCNN, "resnet18": ResNet18}


class SingleHeadNet(nn.Module):
    def __init__(self, features: nn.Module, n_classes: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(features.out_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MultiHeadNet(MultiTaskModule):
    """Shared features, one linear head per task, all created up front so that a task
    not trained yet can still be evaluated (for forward transfer)."""

    def __init__(self, features: nn.Module, head_sizes: list[int]):
        super().__init__()
        self.features = features
        self.heads = nn.ModuleList(nn.Linear(features.out_features, size) for size in head_sizes)
        self.max_class_label = max(head_sizes)

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.heads[task_label](self.features(x))


def build_model(spec: ModelSpec) -> nn.Module:
    """The dense network every baseline trains: multi-head in the task setting."""
    if spec.backbone not in BACKBONES:
        raise UserError(f"unknown backbone {spec.backbone!r}; choose one of: {', '.join(BACKBONES)}")
    features = BACKBONES[spec.backbone](spec.input_shape[0], spec.width, spec.input_shape[1])
    if spec.setting == "task":
        return MultiHeadNet(features, [len(classes) for classes in spec.task_classes])
    return SingleHeadNet(features, spec.n_classes)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers as stored (float32 here)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def unparametrise(model: nn.Module) -> nn.Module:
    """`model`, in place, with every tensor parametrised through `torch.nn.utils.parametrize`
    (ltp's soft thresholds) a plain parameter holding its current value: a module variant
    edits and measures plain weights. Not `parametrize.remove_parametrizations`: it deletes
    the tensor's property from the module's class, which a deep copy shares with its
    original."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            values = {name: getattr(module, name).detach() for name in module.parametrizations}
            del module._modules["parametrizations"]
            module.__class__ = type(module).__bases__[0]
            for name, value in values.items():
                module.register_parameter(name, nn.Parameter(value))
    return model

"""Networks with one path per task, shared by ccgn and HAT: every layer's output channels
are multiplied by a mask of the task in hand. The mask comes from the layer class the
strategy passes in: ccgn's input-dependent gates (`clbench.gates.GatedLayer`) or HAT's
per-task attention (`clbench.attention.AttentionLayer`).

What a forward pass did (each layer's mask and active inputs, the MACs each sample
executed) is returned in a `PathTrace`, never left on the modules, so a batch that mixes
tasks is accounted sample by sample. Kernels (output channels) a learned task relies on
are protected by the strategy; `FreezableBatchNorm2d` keeps their running statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Callable, Iterable

import torch
import torch.nn.functional as F
from avalanche.models import MultiTaskModule
from torch import nn
from torch.nn.utils import parametrize

from clbench.errors import UserError
from clbench.models import ModelSpec, channels_last, resnet_layout

if TYPE_CHECKING:
    from clbench.compact import CompactPath

CLASSIFIER_HIDDEN = 64
# Class setting: scores of tasks the task classifier did not pick are lowered by this much
# (see TaskPathNet.class_scores).
OFF_TASK_PENALTY = 1e4
# The key in `TaskPathNet._compact_paths` of the class setting's paths run as one (`stacked_path`).
STACKED = "learned tasks"
# Compact paths computing each sample's open channels run a larger batch in parts of this
# many samples: the weights they gather for each sample outgrow the caches. On ccgn's
# small CNN (`benchmarks/batch_thresholds.py`, task setting, one thread) their time per
# sample was least at batches of 128-256 on three networks, and at 512 up to 1.4 times
# as long; on a 1-epoch network at 256-512 they ran at 0.72x the dense one.
PER_SAMPLE_MAX_BATCH = 128


class FreezableBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose `frozen` channels behave as in evaluation even while training:
    normalised with their stored statistics, which are never updated.

    In training, one batch norm with batch statistics whose weight is 0 on the frozen
    channels and whose bias there is the evaluation's shift, plus x times the evaluation's
    scale on the frozen channels: the other channels' outputs and gradients are exactly a
    plain batch norm's, the frozen ones' those of evaluation up to float rounding. Running
    two batch norms and selecting per channel took 1.3-2.3 times as long per batch norm,
    1.08 times per training step of ccgn's ResNet-18 (`benchmarks/freezable_batch_norm.py`).

    `frozen_channels_learn` False: the frozen channels' weight and bias get no gradient
    (zero), for a strategy that discards it (ccgn freezes them): their evaluation-mode
    scaling is then a constant, which spares its small operations' backward and a
    full-size product summed per channel. Every other gradient is the same to the bit."""

    frozen_channels_learn = True  # HAT scales the frozen channels' gradients, not zeroes them

    def __init__(self, channels: int):
        super().__init__(channels)
        self.register_buffer("frozen", torch.zeros(channels, dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Compiled (torch.compile), the frozen channels' computation runs even where none is
        # frozen, which is then a plain batch norm's to the bit: branching on `frozen.any()`
        # would break the graph at every batch norm.
        if not self.training or not (torch.compiler.is_compiling() or self.frozen.any()):
            return super().forward(x)
        frozen = self.frozen.to(x.dtype)
        # Copies, not the statistics themselves: the backward passes of `shift` and of
        # `F.batch_norm` need them as they are now, and the statistics are updated in place.
        old_mean, mean, var = self.running_mean.clone(), self.running_mean.clone(), self.running_var.clone()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.frozen_channels_learn):
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            shift = self.bias - old_mean * scale
        trained = F.batch_norm(x, mean, var, self.weight * (1 - frozen), torch.lerp(self.bias, shift, frozen), True,
                               self.momentum, self.eps)
        self.num_batches_tracked.add_(1)
        self.running_mean.copy_(torch.where(self.frozen, self.running_mean, mean))
        self.running_var.copy_(torch.where(self.frozen, self.running_var, var))
        return torch.addcmul(trained, x, (scale * frozen)[None, :, None, None])


def raw_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """`module`'s tensor `name` as stored: where `torch.nn.utils.parametrize` computes it
    (ltp's soft thresholds), the original it is computed from."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def masked_macs(in_mask: torch.Tensor, out_mask: torch.Tensor, per_pair: int) -> torch.Tensor:
    """MACs per sample of a layer whose inputs and outputs below a mask of one half are
    skipped: active inputs x active outputs x MACs per input-output pair."""
    return (in_mask.detach() > 0.5).sum(1) * (out_mask.detach() > 0.5).sum(1) * per_pair


def positions_mean(x: torch.Tensor) -> torch.Tensor:
    """A conv layer's output (or input) averaged over positions, batch x channels; a linear
    layer's as it is. `x.mean((2, 3))` to the bit, gradient included, but its backward
    divides the small gradient and broadcasts it, where `mean`'s writes a full-size
    gradient and then adds it to the layer's input gradient, one more pass over the
    largest tensors of ccgn's training step (`benchmarks/README.md`, "The gates' pooling
    in training")."""
    return x.sum((2, 3)) / (x.shape[2] * x.shape[3]) if x.dim() == 4 else x


@dataclass
class PathTrace:
    """What one forward pass through a task's path did, per sample: every masked layer's
    mask (batch x units, in the order of `TaskPathNet.path_layers`); outside training
    also its active input units and the MACs executed (training reads only the masks:
    counting took about 1% of ccgn's training step); in training, ccgn's gates also
    record the probability of each gate before its noise and threshold
    (`probabilities`, for batch-shaping). Where `stages` is a list, the backbone adds the
    output of each of its stages averaged over positions (`pool_stage`), the last being
    its features: the task classifier's input with classifier_layers "all"."""

    masks: list[torch.Tensor] = field(default_factory=list)
    probabilities: list[torch.Tensor] = field(default_factory=list)
    active_inputs: list[torch.Tensor] = field(default_factory=list)
    macs: torch.Tensor | int = 0
    stages: list[torch.Tensor] | None = None

    def pool_stage(self, x: torch.Tensor) -> None:
        if self.stages is not None:
            self.stages.append(positions_mean(x))


class PathLayer(nn.Module):
    """A conv or linear layer (with optional batch norm) whose output channels are
    multiplied by a per-task, per-sample mask from `mask(x, task)`. `tied` layers (a
    ResNet projection shortcut) share the mask and go with the layer's kernels when they
    are frozen or protected. A channel whose mask is below one half counts as skipped in
    the MACs, on the output side and as the next layer's input."""

    mask_macs = 0  # MACs of computing the mask for one sample
    positions = 1  # output positions per sample at the network's input size, set by the backbone
    masks_per_sample = False  # whether samples of one task can have different masks
    closed_gates_learn = False  # a mask of 0 gets the gradient of opening (see forward)

    def __init__(self, layer: nn.Conv2d | nn.Linear, norm: nn.Module | None, tied: nn.Sequential | None = None):
        super().__init__()
        self.layer, self.norm, self.tied = layer, norm, tied
        self.in_units = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
        self.out_units = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features

    @property
    def pair_macs(self) -> int:
        """MACs per input and output unit at one output position: the kernel's size."""
        return self.layer.weight[0].numel() // self.in_units

    def mask(self, x: torch.Tensor, task: int, trace: PathTrace) -> torch.Tensor:
        """batch x out_units mask of task `task` for input `x`; what the strategy's loss
        needs from computing it, besides the mask, goes in `trace`."""
        raise NotImplementedError

    def kept_channels(self, task: int) -> torch.Tensor:
        """Which output channels task `task`'s mask at test can leave nonzero: the only ones
        its compact path (`clbench.compact`) computes."""
        raise NotImplementedError

    def compact_mask(self, tasks: tuple[int, ...], kept_in: torch.Tensor, kept_out: torch.Tensor) -> Callable:
        """The mask at test for a layer cut to the input and output channels indexed by
        `kept_in` and `kept_out`, of a batch of len(tasks) equal chunks, chunk k through
        task tasks[k]'s path: a function of the layer's (cut) input, batch x kept. A
        channel kept but not kept by a chunk's task is closed there."""
        raise NotImplementedError

    def mask_modules(self, task: int) -> list[nn.Module]:
        """The modules whose tensors `kept_channels` and `compact_mask` read."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, task: int, active_in: torch.Tensor, trace: PathTrace,
                then: Callable | None = None):
        """Masked output and the mask, given which input units of each sample are active
        (`active_in`, batch x units); records the mask in `trace`, and outside training
        the active inputs and the MACs. `then`, the ReLU (and max-pooling) that follows
        the layer, runs before the mask multiplication, as it commutes with scaling a
        channel by a mask >= 0: after pooling, the multiplication and its backward touch
        a quarter of the values. Gradients are those of the mask applied first, which at
        a mask of 0 (a closed straight-through gate) leaves the ReLU at its kink, passing
        the mask no gradient (the mask multiplied is `mask * (mask > 0)`); unless
        `closed_gates_learn`, where a closed gate gets the gradient of opening it, that of
        a mask multiplying the activated output."""
        mask = self.mask(x, task, trace)
        out = self.layer(x)
        if self.norm is not None:
            out = self.norm(out)
        trace.masks.append(mask)
        if not self.training:
            spatial = out.shape[2] * out.shape[3] if out.dim() == 4 else 1
            trace.active_inputs.append(active_in.detach())
            trace.macs = trace.macs + masked_macs(active_in, mask, self.pair_macs * spatial) + self.mask_macs
        applied = mask
        if then is not None:
            out = then(out)
            if not self.closed_gates_learn:
                applied = mask * (mask > 0)
        return out * applied.view(*mask.shape, *[1] * (out.dim() - 2)), mask

    def kernel_modules(self) -> list[nn.Module]:
        return [m for m in [self.layer, self.norm] + list(self.tied or []) if m is not None]

    def kernel_parameters(self) -> list[torch.Tensor]:
        """Every parameter whose first dimension indexes this layer's kernels (of a weight
        parametrised by a module, such as ltp's soft thresholds, the original)."""
        return [p for m in self.kernel_modules() for p in m.parameters(recurse=False)] + \
            [raw_tensor(m, name) for m in self.kernel_modules() if parametrize.is_parametrized(m)
             for name in m.parametrizations]

    def set_frozen_statistics(self, frozen: torch.Tensor) -> None:
        for module in self.kernel_modules():
            if isinstance(module, FreezableBatchNorm2d):
                module.frozen.copy_(frozen)


class PathSmallCNN(nn.Module):
    """`clbench.models.SmallCNN` with masked output channels on both conv layers and
    units on the fully connected layer (the same function with every mask open, tested).
    `make_layer(layer, norm, tied=None)` builds the masked layers."""

    # The smallest batch on which compact paths compute each sample's open channels
    # (`TaskPathNet.runs_per_sample`): on smaller ones the kept channels, padded, took less
    # time (`benchmarks/batch_thresholds.py`).
    per_sample_from_batch = 16

    def __init__(self, in_channels: int, width: int, input_size: int, make_layer: Callable):
        super().__init__()
        self.in_channels, self.out_features = in_channels, 4 * width
        self.spatial_after_convs = (input_size // 4) ** 2
        self.layers = nn.ModuleList([
            make_layer(nn.Conv2d(in_channels, width, 3, padding=1), None),
            make_layer(nn.Conv2d(width, width, 3, padding=1), None),
            make_layer(nn.Linear(width * self.spatial_after_convs, self.out_features), None),
        ])
        self.layers[0].positions, self.layers[1].positions = input_size**2, (input_size // 2) ** 2
        self.stage_features = sum(layer.out_units for layer in self.layers)  # every layer is a stage

    def forward(self, x: torch.Tensor, task: int, trace: PathTrace) -> torch.Tensor:
        x, active = channels_last(x), torch.ones(len(x), self.in_channels, device=x.device)
        for index, layer in enumerate(self.layers):
            if index == 2:
                x = x.flatten(1)
                active = active.repeat_interleave(self.spatial_after_convs, 1)
            x, mask = layer(x, task, active, trace, then=pool_and_relu if index < 2 else F.relu)
            active = mask.detach()
            trace.pool_stage(x)
        return x


def pool_and_relu(x: torch.Tensor) -> torch.Tensor:
    """The small CNN's max-pooling and ReLU, pooling first, as `clbench.models.SmallCNN`."""
    return F.relu(F.max_pool2d(x, 2))


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

    def forward(self, x: torch.Tensor, task: int, active_in: torch.Tensor, trace: PathTrace):
        """Output and its active channels."""
        h, mask1 = self.conv1(x, task, active_in, trace, then=F.relu)
        out, mask2 = self.conv2(h, task, mask1.detach(), trace)
        if self.conv2.tied is None:
            return F.relu(out + x), torch.maximum(mask2.detach(), active_in)
        if not self.training:
            trace.macs = trace.macs + masked_macs(active_in, mask2, out.shape[2] * out.shape[3])
        return F.relu(out + self.conv2.tied(x) * mask2[:, :, None, None]), mask2.detach()


class PathResNet18(nn.Module):
    """`clbench.models.ResNet18` (CIFAR stem, `width` channels in the first stage) with
    every conv masked (the same function with every mask open, tested)."""

    # Never each sample's channels (`TaskPathNet.runs_per_sample`): the kept ones took less
    # time at every batch up to 64, with random gates and with trained ones
    # (`benchmarks/batch_thresholds.py`, `benchmarks/gated_inference.py`).
    per_sample_from_batch = None

    def __init__(self, in_channels: int, width: int, input_size: int, make_layer: Callable):
        super().__init__()
        self.in_channels, self.out_features = in_channels, 8 * width
        self.stem = make_layer(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), FreezableBatchNorm2d(width))
        self.stem.positions = input_size**2
        blocks, channels, size = [], width, input_size
        for stage, stride in enumerate((1, 2, 2, 2)):
            out, size = width * 2**stage, (size - 1) // stride + 1
            blocks += [PathBasicBlock(channels, out, stride, make_layer), PathBasicBlock(out, out, 1, make_layer)]
            for block in blocks[-2:]:
                block.conv1.positions = block.conv2.positions = size**2
            channels = out
        self.blocks = nn.ModuleList(blocks)
        # The stem and every block are stages.
        self.stage_features = self.stem.out_units + sum(block.conv2.out_units for block in self.blocks)

    def forward(self, x: torch.Tensor, task: int, trace: PathTrace) -> torch.Tensor:
        active = torch.ones(len(x), self.in_channels, device=x.device)
        x, mask = self.stem(resnet_layout(x, self.stem.layer.out_channels), task, active, trace, then=F.relu)
        active = mask.detach()
        trace.pool_stage(x)
        for block in self.blocks:
            x, active = block(x, task, active, trace)
            trace.pool_stage(x)
        return positions_mean(x)


PATH_BACKBONES = {"small_cnn": PathSmallCNN, "resnet18": PathResNet18}


class TaskPathNet(MultiTaskModule):
    """A backbone of `PathLayer`s, whose masks give every task its own path, with one head
    per task; in the class setting also the task classifier that picks which task's path
    and head to trust.

    `forward` is what Avalanche and the baselines' evaluation call; `forward_with_macs`
    also returns the MACs each sample executed, and `forward_path` the whole trace of
    one task's path (for the strategies' losses and statistics). In eval mode without
    autograd, `forward_with_macs` and `learned_paths` run each task's compact path
    (`clbench.compact`), cut to the kernels the task can open, instead of the masked
    layers: at test, and in training for the task classifier's input from the learned
    paths; whatever trains runs the masked layers.
    """

    compact_inference = True  # False: the masked layers at test too (a benchmark's baseline)
    # Class setting (`stacked_path`): the largest batch on which the paths may run as one,
    # and what a layer of a path costs beyond its MACs, in MACs.
    stacked_paths_max_batch = 32
    stacked_layer_macs = 1e7
    compile_compact = False  # True: compact paths compiled by torch.compile (`clbench.compact.CompactPath`)
    per_sample_channels = True  # False: compact paths compute the same channels for every sample of a batch
    normalise_task_features = False  # set by the strategy's classifier_input

    def __init__(self, backbone: nn.Module, spec: ModelSpec, classifier_layers: str = "last"):
        """classifier_layers: the task classifier reads each path's features ("last") or
        the output of every stage of the backbone averaged over positions ("all": each
        layer of the small CNN, the stem and each block of ResNet-18)."""
        super().__init__()
        self.backbone, self.setting, self.n_classes = backbone, spec.setting, spec.n_classes
        self.task_classes = spec.task_classes
        self.heads = nn.ModuleList(nn.Linear(backbone.out_features, len(c)) for c in spec.task_classes)
        self.max_class_label = max(len(c) for c in spec.task_classes)
        self.tasks_learned = 0
        self._compact_paths = {}  # task (or STACKED) -> CompactPath, rebuilt when out of date
        self.classifier_reads_stages = classifier_layers == "all"
        self.task_features = backbone.stage_features if self.classifier_reads_stages else backbone.out_features
        if spec.setting == "class":
            self.task_classifier = nn.Sequential(nn.Linear(spec.n_tasks * self.task_features, CLASSIFIER_HIDDEN),
                                                 nn.ReLU(), nn.Linear(CLASSIFIER_HIDDEN, spec.n_tasks))

    @cached_property
    def path_layers(self) -> list[PathLayer]:
        """The masked layers in forward order, found once: walking every module on each
        access took about 1% of ccgn's training step, which reads them every iteration."""
        return list(self.named_path_layers().values())

    def task_modules(self, task: int) -> list[nn.Module]:
        """The modules that hold what task `task`'s path has of its own: each layer's
        mask modules (`PathLayer.mask_modules`, which may name one that every task shares,
        as HAT's embedding) and the task's head."""
        return [m for layer in self.path_layers for m in layer.mask_modules(task)] + [self.heads[task]]

    def named_path_layers(self) -> dict[str, PathLayer]:
        """The masked layers in forward order, named by their place in the backbone."""
        return {name: m for name, m in self.backbone.named_modules() if isinstance(m, PathLayer)}

    def forward_path(self, x: torch.Tensor, task: int) -> tuple[torch.Tensor, PathTrace]:
        """Logits of one task's path and head, and the trace of that path."""
        trace = PathTrace()
        head = self.heads[task]
        logits = head(self.backbone(x, task, trace))
        trace.macs = trace.macs + head.in_features * head.out_features
        return logits, trace

    def forward_single_task(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.run_path(x, task)[0]

    def runs_compact(self) -> bool:
        """Compact paths at test; where gradients may be wanted they would not reach the
        parameters, so there the masked layers run."""
        return self.compact_inference and not self.training and not torch.is_grad_enabled()

    def runs_per_sample(self, x: torch.Tensor) -> bool:
        """Whether compact paths compute each sample's open channels
        (`clbench.compact.SampleChannels`): where masks differ between samples, for batches
        of at least the backbone's `per_sample_from_batch` (None: never); not where they
        are compiled (the number of channels a batch opens changes the shapes)."""
        threshold = self.backbone.per_sample_from_batch
        return self.per_sample_channels and threshold is not None and len(x) >= threshold and \
            not self.compile_compact and any(layer.masks_per_sample for layer in self.path_layers)

    def stacked_path(self, x: torch.Tensor) -> CompactPath | None:
        """The class setting's compact paths run as one, on the batch repeated once per
        learned task (`clbench.compact.CompactPath.stacked`), or None where they run
        separately. As one, a pass runs each layer once, not once per path, but computes
        the union of the paths' channels for every path: `CompactPath.extra_macs` per
        sample more. They run as one on batches of at most `stacked_paths_max_batch`
        where those MACs over the batch are at most what the separate paths' layers cost
        beyond their MACs, `stacked_layer_macs` per layer and path saved. That cost was
        fitted on `benchmarks/batch_thresholds.py`, one thread (benchmarks/README.md,
        "Paths run as one, by their MACs"): the small CNN trained on Split MNIST, whose
        paths share most of their channels, ran faster as one up to a batch of 32;
        ResNet-18 with random gates up to a batch of 4 at width 16 and never at widths
        32 and 64, as the MACs the union adds grow with the width squared. Where the
        two cost about the same it can pick the slower (as one at width 32, batch 1)."""
        if self.tasks_learned < 2 or len(x) > self.stacked_paths_max_batch:
            return None
        path = self.compact_paths([tuple(range(self.tasks_learned))])[0]
        saved = (self.tasks_learned - 1) * len(self.path_layers) * self.stacked_layer_macs
        return path if len(x) * path.extra_macs <= saved else None

    def compact_paths(self, task_sets: Iterable[tuple[int, ...]]) -> list[CompactPath]:
        """A compact path for each set of tasks (one task's, or several run as one),
        rebuilt whenever a tensor it was cut from has changed. One path of several tasks
        is kept at a time, as only the learned tasks run together."""
        from clbench.compact import CompactPath  # built on this module's classes

        paths = []
        for tasks in task_sets:
            key = tasks[0] if len(tasks) == 1 else STACKED
            path = self._compact_paths.get(key)
            if path is None or path.tasks != tasks or not path.is_current():
                self._compact_paths[key] = path = CompactPath(self, tasks)
            paths.append(path)
        return paths

    def __getstate__(self) -> dict:
        """Checkpoints and copies leave out the compact paths, which are rebuilt on use."""
        return {**self.__dict__, "_compact_paths": {}}

    def run_path(self, x: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of one task's path and head, and the MACs each sample executed: the
        compact path where `runs_compact()`, else the masked one."""
        if self.runs_compact():
            return self.compact_paths([(task,)])[0](x, self.runs_per_sample(x))
        logits, trace = self.forward_path(x, task)
        return logits, trace.macs

    def masked_path(self, x: torch.Tensor, task: int,
                    trace: PathTrace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Task `task`'s masked path on `x`: its features (the head's input) and what the
        task classifier reads of them (see `classifier_layers`)."""
        trace = trace or PathTrace()
        if self.classifier_reads_stages:
            trace.stages = []
        features = self.backbone(x, task, trace)
        return features, torch.cat(trace.stages, 1) if self.classifier_reads_stages else features

    def learned_paths(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """The task classifier's input from every learned task's path (at least one), the
        paths' head logits, and the MACs of all (heads included): compact paths where
        `runs_compact()`."""
        tasks = range(max(self.tasks_learned, 1))
        if self.runs_compact():
            from clbench.compact import run_learned_paths

            stacked = self.stacked_path(x)
            if stacked is not None:
                return stacked.stacked(x, self.classifier_reads_stages)
            paths = self.compact_paths([(task,) for task in tasks])
            return run_learned_paths(paths, x, self.classifier_reads_stages, self.runs_per_sample(x))
        read, logits, macs = [], [], 0
        for task in tasks:
            trace = PathTrace()
            features, classifier_input = self.masked_path(x, task, trace)
            head = self.heads[task]
            read.append(classifier_input)
            logits.append(head(features))
            macs = macs + trace.macs + head.in_features * head.out_features
        return read, logits, macs

    def classify_task(self, features: torch.Tensor) -> torch.Tensor:
        """Task-classifier logits over the learned tasks, from what it reads of their paths
        concatenated, each path's scaled to norm sqrt(size) where
        `normalise_task_features` (so that no path's features dominate by their scale);
        paths not learned yet enter as zeros."""
        learned = features.shape[1] // self.task_features
        if self.normalise_task_features:
            per_path = features.view(len(features), learned, -1)
            features = (F.normalize(per_path, dim=2) * per_path.shape[2] ** 0.5).flatten(1)
        padding = self.task_classifier[0].in_features - features.shape[1]
        return self.task_classifier(F.pad(features, (0, padding)))[:, :learned]

    def class_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class setting, no task label: scores over all classes and MACs per sample.

        Each task's classes get its own head's log-softmax, lowered by OFF_TASK_PENALTY
        unless the task classifier picked that task. The argmax is thus the picked head's
        choice, and restricting the scores to one task's classes gives that task's head
        (the oracle prediction); classes of tasks not learned yet score -inf."""
        features, logits, macs = self.learned_paths(x)
        picked = self.classify_task(torch.cat(features, 1)).argmax(1)
        columns, column_task = class_columns(tuple(map(tuple, self.task_classes[:len(logits)])), x.device)
        penalty = OFF_TASK_PENALTY * (picked[:, None] != column_task).to(x.dtype)
        learned = torch.cat([F.log_softmax(task_logits, 1) for task_logits in logits], 1) - penalty
        scores = torch.full((len(x), self.n_classes), -torch.inf, device=x.device).index_copy_(1, columns, learned)
        layers = [m for m in self.task_classifier if isinstance(m, nn.Linear)]
        return scores, macs + sum(layer.in_features * layer.out_features for layer in layers)

    def forward_with_macs(self, x: torch.Tensor, task_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs and MACs executed per sample. Task setting: each sample through its own
        task's path and head, outputs zero-padded to the largest head (as Avalanche's
        `MultiTaskModule.forward`), whatever mix of tasks the batch holds. Where compact
        paths compute each sample's channels, in parts of PER_SAMPLE_MAX_BATCH samples."""
        if len(x) > PER_SAMPLE_MAX_BATCH and self.runs_compact() and self.runs_per_sample(x):
            outputs, macs = zip(*(self.forward_with_macs(*part) for part in
                                  zip(x.split(PER_SAMPLE_MAX_BATCH), task_labels.split(PER_SAMPLE_MAX_BATCH))))
            return torch.cat(outputs), torch.cat(macs)
        if self.setting == "class":
            return self.class_scores(x)
        out = torch.zeros(len(x), self.max_class_label, device=x.device)
        macs = torch.zeros(len(x), dtype=torch.long, device=x.device)
        for task in task_labels.unique().tolist():
            picked = task_labels == task
            logits, macs[picked] = self.run_path(x[picked], task)
            out[picked, : logits.shape[1]] = logits
        return out, macs

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor) -> torch.Tensor:
        return self.forward_with_macs(x, task_labels)[0]


@lru_cache(maxsize=64)
def class_columns(task_classes: tuple[tuple[int, ...], ...],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The class ids of the tasks' heads, in order, and the task of each: made once, not
    on every forward pass."""
    columns = [c for classes in task_classes for c in classes]
    column_task = [task for task, classes in enumerate(task_classes) for _ in classes]
    return torch.tensor(columns, device=device), torch.tensor(column_task, device=device)


def build_path_model(spec: ModelSpec, make_layer: Callable, classifier_layers: str = "last") -> TaskPathNet:
    """`spec`'s backbone with every layer made by `make_layer(layer, norm, tied=None)`;
    classifier_layers as `TaskPathNet`'s."""
    if spec.backbone not in PATH_BACKBONES:
        raise UserError(f"backbone {spec.backbone!r} has no per-task-path version; "
                        f"choose one of: {', '.join(PATH_BACKBONES)}")
    network = PATH_BACKBONES[spec.backbone](spec.input_shape[0], spec.width, spec.input_shape[1], make_layer)
    return TaskPathNet(network, spec, classifier_layers)

"""Compact execution of a task's path at test: the network cut to the kernels the task's
mask can open, so that closed channels cost no time. The masked layers of
`clbench.path_network` compute every channel and multiply most of them by zero; with
sparse gates that is as slow as the dense network.

Each masked layer keeps the output channels of `PathLayer.kept_channels(task)` and the
input channels its input layer kept; in a ResNet stage, the layers adding into the
residual stream all keep the channels any of them keeps (`residual_streams`). Weights,
biases, batch norms, the gating modules' first layer and the head are cut alike, and each
batch norm is folded into the layer before it. A channel cut away is exactly zero in the
masked network, so the outputs are the masked network's up to the rounding of float sums
(which could flip a gate whose logit is within rounding of 0), and each sample's MACs are
counted as there (the channels its mask opened). In the class setting, where every learned
task's path reads the same image, the paths' first layer runs once for all
(`SharedFirstLayer`); on small batches the paths run as one, cut to the union of the
tasks' kernels, on the batch repeated once per task (`CompactPath.stacked`).

Where masks differ between samples (ccgn's gates), on large enough batches a path goes
further and computes each sample's open channels only (`SampleChannels`): one grouped
convolution per layer, one group per sample, whose weights are gathered for each sample
from the path's kept ones (on output maps of at least `PER_SAMPLE_MIN_POSITIONS`
positions). The samples of a batch open different channels (most of those their task
keeps between them), so one set of channels for the whole batch saves little over the
kept ones. `TaskPathNet` decides which execution runs (`runs_per_sample`, `stacked_path`).

A compact path remembers every tensor it was cut from (its version counter and storage)
and `TaskPathNet` rebuilds it once any of them changed: an optimiser step,
`GatedLayer.freeze`, `load_state_dict`, a move to another device; and once any
parameter, buffer or submodule of any module was assigned anew (`Registrations`), as a
tensor or module put in another's place is one the path does not know. Only a write in
place through `.data`, which bypasses the version counter, would go unseen; clbench
makes none.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from clbench.models import channels_last
from clbench.path_network import (PathBasicBlock, PathLayer, PathResNet18, PathSmallCNN, TaskPathNet,
                                  pool_and_relu, positions_mean)


def kept_by_task(layer: PathLayer, tasks: tuple[int, ...]) -> torch.Tensor:
    """len(tasks) x out_units: the output channels each task keeps in `layer`."""
    return torch.stack([layer.kept_channels(task) for task in tasks])


def keeps_any(layer: PathLayer, tasks: tuple[int, ...]) -> torch.Tensor:
    return kept_by_task(layer, tasks).any(0)


def kept(layer: PathLayer, tasks: tuple[int, ...]) -> torch.Tensor:
    """Indices of the output channels any of `tasks` keeps in `layer`; where they keep
    none, channel 0, which `CompactLayer` keeps closed (convolutions, pooling and batch
    norm need a channel)."""
    index = keeps_any(layer, tasks).nonzero().flatten()
    return index if len(index) else index.new_zeros(1)


def widen(x: torch.Tensor, index: torch.Tensor, channels: int) -> torch.Tensor:
    """`x` (batch x kept channels) placed at channels `index` of `channels` zero ones."""
    return x.new_zeros(len(x), channels).index_copy_(1, index, x)


# oneDNN's float convolutions and channels-last max-pooling on AVX2 run fastest at a
# multiple of 8 channels, the register width (benchmarks/channel_counts.py, batch 64, one
# thread): 27 -> 27 channels at 14 x 14 took 2.83 ms, 27 -> 32 2.11 ms; max-pooling 27
# channels at 28 x 28 1.43 ms, 32 channels 0.73 ms.
CHANNEL_MULTIPLE = 8


def pool_stage(stages: list[torch.Tensor] | None, x: torch.Tensor, index: torch.Tensor, channels: int) -> None:
    """As `PathTrace.pool_stage`, for a stage output holding channels `index` of `channels`."""
    if stages is not None:
        stages.append(widen(positions_mean(x), index, channels))


def padded(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([tensor, tensor.new_zeros(rows, *tensor.shape[1:])])


def folded(weight: torch.Tensor, bias: torch.Tensor | None, norm: nn.Module,
           kept: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a layer followed by channels `kept` of batch norm at test, as one
    layer: (Wx + b - mean) * gamma / sqrt(var + eps) + beta. One operation fewer per layer."""
    scale = norm.weight.detach()[kept] / torch.sqrt(norm.running_var[kept] + norm.eps)
    shift = norm.bias.detach()[kept] - norm.running_mean[kept] * scale
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.view(-1, *[1] * (weight.dim() - 1)), shift


class MacCount:
    """The MACs each sample executes in one compact forward pass, counted at its end. Each
    term is a layer's active inputs times its open outputs (those above one half) times
    its MACs per input-output pair, as `masked_macs` counts them, plus its gates' fixed
    MACs. Every term's masks are concatenated and summed per term in one matrix product,
    instead of about eight small operations per layer: at batch 1 those are a large
    share of the forward pass (`benchmarks/README.md`, "MAC counting and the shared first layer")."""

    def __init__(self):
        self.inputs, self.outputs, self.per_pair, self.fixed = [], [], [], 0

    def add(self, active_in: torch.Tensor, mask: torch.Tensor, per_pair: int, fixed: int = 0) -> None:
        self.inputs.append(active_in)
        self.outputs.append(mask)
        self.per_pair.append(per_pair)
        self.fixed += fixed

    def total(self) -> torch.Tensor:
        per_pair = cached_vector(tuple(self.per_pair), self.outputs[0].device)
        opened = open_units(self.inputs + self.outputs)
        return ((opened[:, :len(self.inputs)] * opened[:, len(self.inputs):]) @ per_pair).long() + self.fixed


def open_units(masks: list[torch.Tensor]) -> torch.Tensor:
    """batch x len(masks): how many units above one half each mask has, per sample (exact:
    float64 counts)."""
    widths = tuple(mask.shape[1] for mask in masks)
    return (torch.cat(masks, 1) > 0.5).double() @ segments(widths, masks[0].device)


@lru_cache(maxsize=256)
def segments(widths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """sum(widths) x len(widths): which mask of `open_units` each unit belongs to; cached,
    as every forward pass of a path concatenates masks of the same widths."""
    return torch.block_diag(*(torch.ones(width, 1, dtype=torch.float64) for width in widths)).to(device)


@lru_cache(maxsize=256)
def cached_vector(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`values` as a float64 tensor, made once per path rather than once per forward pass."""
    return torch.tensor(values, dtype=torch.float64, device=device)


def open_first(mask: torch.Tensor) -> torch.Tensor:
    """batch x n: each sample's open channels (mask > 0) first, then closed ones, n the
    most channels any sample of the batch opens (at least 1)."""
    n = max(int((mask > 0).sum(1).max()), 1)
    return mask.argsort(dim=1, descending=True)[:, :n]


@dataclass
class SampleChannels:
    """A layer's output computed per sample on the channels that sample opened. `values`:
    1 x (batch * n) x H x W, sample i's channels at i * n ... (i + 1) * n, the input a
    convolution of one group per sample reads; `index`: batch x n, their positions among
    the layer's kept channels, padded with closed ones (whose values are 0); `active`:
    batch x kept, the layer's mask, which the MAC count reads."""

    values: torch.Tensor
    index: torch.Tensor
    active: torch.Tensor

    @classmethod
    def of_images(cls, images: torch.Tensor) -> SampleChannels:
        batch, channels = images.shape[:2]
        every = torch.arange(channels, device=images.device).expand(batch, -1)
        values = channels_last(images.reshape(1, batch * channels, *images.shape[2:]))
        return cls(values, every, images.new_ones(batch, channels))

    def spread(self) -> torch.Tensor:
        """batch x kept x H x W, zeros where a sample's channel was not computed."""
        per_sample = self.values.view(*self.index.shape, *self.values.shape[2:])
        out = self.values.new_zeros(*self.active.shape, *self.values.shape[2:])
        return out.scatter_(1, self.index[:, :, None, None].expand_as(per_sample), per_sample)

    def pooled(self) -> torch.Tensor:
        """batch x kept: each channel averaged over positions (0 where not computed)."""
        means = positions_mean(self.values).view(self.index.shape)
        return means.new_zeros(self.active.shape).scatter_(1, self.index, means)

    def columns(self, channels: torch.Tensor) -> torch.Tensor:
        """Positions x (batch * m): each sample's `channels` (batch x m, positions among
        the kept ones; the number of kept ones for a channel not kept), zero where not
        computed, picked from `values` seen as positions x (batch * n) (a view)."""
        rows = self.values.permute(0, 2, 3, 1).flatten(0, 2)
        slots = torch.arange(self.index.numel(), device=rows.device).view_as(self.index)
        not_computed = self.index.numel()  # the zero column appended below
        batch, kept = self.active.shape
        column = torch.full((batch, kept + 1), not_computed, device=rows.device).scatter_(1, self.index, slots)
        return F.pad(rows, (0, 1)).index_select(1, column.gather(1, channels).flatten())

    @classmethod
    def of_columns(cls, columns: torch.Tensor, index: torch.Tensor, active: torch.Tensor,
                   size: tuple[int, int]) -> SampleChannels:
        """From positions x (batch * n) columns, as `columns` returns them."""
        return cls(columns.view(1, *size, -1).permute(0, 3, 1, 2), index, active)


# A convolution computes each sample's channels (`CompactConv.per_sample`) only from this
# many output positions on; below, gathering each sample's weights, read once per
# position, costs more than computing every kept channel. `benchmarks/per_sample_positions.py`
# (ccgn's ResNet-18 of width 16-64, batch 64, one thread): with 100, where CIFAR's 8 x 8 and
# 4 x 4 stages compute every kept channel, per-sample channels ran 0.91-1.20 times as fast
# as one set of channels for the batch; with 0, 0.43-1.11 times; with 300, 0.71-0.92.
PER_SAMPLE_MIN_POSITIONS = 100

# A grouped convolution (`CompactConv.per_sample`) reading channels-last inputs whose
# positions lie a multiple of 4 KiB apart ran 1.16-8.53 times as long as the same one
# reading a zero channel more per sample, the copy that adds it included; at odd multiples
# of 2 KiB 0.67-4.04 times (`benchmarks/grouped_strides.py`, batches of 32-128, one
# thread), likely as what the convolution reads together falls into the same few sets of
# the L1 cache. Each sample's channels get that zero channel there.
ALIASED_STRIDE_BYTES = 4096


def aliased(values: torch.Tensor) -> bool:
    """Whether the positions of `SampleChannels.values` (channels-last) lie a multiple of
    ALIASED_STRIDE_BYTES apart."""
    return values.shape[1] * values.element_size() % ALIASED_STRIDE_BYTES == 0


def with_zero_channel(values: torch.Tensor, groups: int) -> torch.Tensor:
    """`SampleChannels.values` (1 x (groups * n) x H x W, channels-last) with a zero channel
    after each group's n."""
    _, channels, height, width = values.shape
    rows = values.permute(0, 2, 3, 1).reshape(height * width, groups, channels // groups)
    return F.pad(rows, (0, 1)).view(1, height, width, -1).permute(0, 3, 1, 2)


class CompactConv:
    """A conv or linear layer and its batch norm (folded in) at test, cut to channels
    `kept_in` in and `kept_out` out. A convolution's output channels are padded with zero
    ones to a multiple of `CHANNEL_MULTIPLE`, after the kept ones."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, norm: nn.BatchNorm2d | None, kept_in: torch.Tensor,
                 kept_out: torch.Tensor):
        self.out_channels = len(kept_out)
        # index_select: indexing both dimensions with tensors, slower, was most of the cut of
        # a small CNN's path, in its linear layer (`benchmarks/path_build.py`)
        weight = layer.weight.detach().index_select(0, kept_out).index_select(1, kept_in)
        bias = None if layer.bias is None else layer.bias.detach()[kept_out]
        if norm is not None:
            weight, bias = folded(weight, bias, norm, kept_out)
        pad = -self.out_channels % CHANNEL_MULTIPLE if isinstance(layer, nn.Conv2d) else 0
        self.weight = padded(weight, pad)
        self.bias = None if bias is None else padded(bias, pad)
        self.conv = (dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
                     if isinstance(layer, nn.Conv2d) else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.linear(x, self.weight, self.bias)
        if x.shape[1] == 1 and x.stride(1) != 1:
            # A convolution's output follows its input's layout. A map of one channel fits
            # both, an elementwise operation can give it NCHW strides, and every
            # convolution after it would then run in NCHW. (Only there: an NCHW map of
            # several channels is a defect upstream, which the layout test catches.)
            x = channels_last(x)
        return F.conv2d(x, self.weight, self.bias, **self.conv)

    def per_sample(self, x: SampleChannels, out_index: torch.Tensor) -> torch.Tensor:
        """The convolution of each sample's channels of `x` into its `out_index` ones (of
        the kept outputs): one group per sample, weights gathered per sample (and a zero
        channel more per sample where ALIASED_STRIDE_BYTES says); 1 x (batch * n_out) x H x W,
        as `SampleChannels.values`. Where the output has fewer than
        `PER_SAMPLE_MIN_POSITIONS` positions, every kept output of every sample instead,
        each sample's then picked."""
        height, width = (1 + (n + 2 * pad - dilation * (k - 1) - 1) // stride for n, k, stride, pad, dilation
                         in zip(x.values.shape[2:], self.weight.shape[2:], *self.conv.values()))
        if height * width < PER_SAMPLE_MIN_POSITIONS:
            every = self(channels_last(x.spread()))
            picked = every.gather(1, out_index[:, :, None, None].expand(-1, -1, height, width))
            return channels_last(picked.view(1, -1, height, width))
        inputs = self.weight.shape[1]  # indexed flat: advanced indexing over two dimensions took 5x as long
        pairs = (out_index[:, :, None] * inputs + x.index[:, None, :]).flatten()
        weight = self.weight.flatten(0, 1).index_select(0, pairs).view(-1, x.index.shape[1], *self.weight.shape[2:])
        bias = None if self.bias is None else self.bias[out_index].flatten()
        values = x.values
        if aliased(values):
            values, weight = with_zero_channel(values, len(out_index)), F.pad(weight, (0, 0, 0, 0, 0, 1))
        return F.conv2d(values, weight, bias, groups=len(out_index), **self.conv)


class CompactLayer:
    """A `PathLayer` cut to the channels its tasks keep (`kept` of `out_units`), masked by
    their masks at test (`PathLayer.compact_mask`)."""

    def __init__(self, layer: PathLayer, tasks: tuple[int, ...], kept_in: torch.Tensor, kept_out: torch.Tensor,
                 inputs_per_unit: int = 1):
        """`inputs_per_unit`: the layer's inputs per unit of the active inputs its calls
        are given (the small CNN's linear layer reads `spatial` features of each active
        channel, whose mask it is given, not repeated per feature)."""
        self.kept, self.out_units = kept_out, layer.out_units
        self.conv = CompactConv(layer.layer, layer.norm, kept_in, kept_out)
        if keeps_any(layer, tasks).any():
            self.mask = layer.compact_mask(tasks, kept_in, kept_out)
        else:
            self.mask = lambda x: x.new_zeros(len(x), len(kept_out))
        self.kernel = layer.pair_macs * inputs_per_unit
        self.mask_macs = layer.mask_macs

    def __call__(self, x: torch.Tensor, active_in: torch.Tensor, count: MacCount,
                 keep_padding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked output and mask; its MACs per sample, as `PathLayer.forward` counts them,
        go to `count`. The output is the kept channels, made dense by the mask
        multiplication; or with `keep_padding`, the convolution's padded output, masked in
        place."""
        mask = self.mask(x)
        out = self.conv(x)
        spatial = out.shape[2] * out.shape[3] if out.dim() == 4 else 1
        count.add(active_in, mask, self.kernel * spatial, self.mask_macs)
        mask_shape = mask.view(*mask.shape, *[1] * (out.dim() - 2))
        if keep_padding:
            out[:, :self.conv.out_channels] *= mask_shape
            return out, mask
        return out[:, :self.conv.out_channels] * mask_shape, mask

    def per_sample(self, x: SampleChannels, count: MacCount, then: Callable | None = None) -> SampleChannels:
        """As a call, but on each sample's open channels only; `then` (the ReLU, or pooling
        and ReLU) runs before the mask multiplication, as in `PathLayer.forward`."""
        mask = self.mask(x.pooled())  # a gate reads its input averaged over positions
        index = open_first(mask)
        out = self.conv.per_sample(x, index)
        count.add(x.active, mask, self.kernel * out.shape[2] * out.shape[3], self.mask_macs)
        if then is not None:
            out = then(out)
        return SampleChannels(out * mask.gather(1, index).view(1, -1, 1, 1), index, mask)

    def per_sample_from_shared(self, x: torch.Tensor, count: MacCount, first: SharedOutput) -> SampleChannels:
        """As `from_shared`, taking each sample's open channels only."""
        mask = self.mask(x)
        count.add(x.new_ones(len(x), x.shape[1]), mask, self.kernel * first.spatial, self.mask_macs)
        index = open_first(mask)
        size = first.out.shape[2:]
        shared = first.out.gather(1, first.positions[self][index][:, :, None, None].expand(-1, -1, *size))
        values = channels_last(shared.view(1, -1, *size))
        return SampleChannels(values * mask.gather(1, index).view(1, -1, 1, 1), index, mask)

    def from_shared(self, x: torch.Tensor, active_in: torch.Tensor, count: MacCount,
                    first: SharedOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """As a call on `x` followed by what `SharedFirstLayer` applies after the
        convolution, but taking this path's channels from the first layer's output shared
        by every path. `x` may be that layer's input repeated (`CompactPath.stacked`):
        the mask multiplication repeats the output alike, by broadcasting."""
        mask = self.mask(x)
        count.add(active_in, mask, self.kernel * first.spatial, self.mask_macs)
        # Selected in channels-last order, so that the result stays channels-last (an
        # index_select over dimension 1 returns NCHW, and the layers after it then run slowly).
        channels = first.out.permute(0, 2, 3, 1).index_select(3, first.positions[self]).permute(0, 3, 1, 2)
        return (channels * mask.view(-1, *channels.shape[:2], 1, 1)).flatten(0, 1), mask


class CompactSmallCNN:
    """`PathSmallCNN` cut to its tasks' channels."""

    def __init__(self, network: PathSmallCNN, tasks: tuple[int, ...]):
        self.in_channels, self.spatial = network.in_channels, network.spatial_after_convs
        device = network.layers[0].layer.weight.device
        kept_in = torch.arange(self.in_channels, device=device)
        self.layers = []
        for index, layer in enumerate(network.layers):
            if index == 2:  # flattened: channel c's features are c * spatial + position
                kept_in = (kept_in[:, None] * self.spatial + torch.arange(self.spatial, device=device)).flatten()
            kept_out = kept(layer, tasks)
            self.layers.append(CompactLayer(layer, tasks, kept_in, kept_out, self.spatial if index == 2 else 1))
            kept_in = kept_out
        self.kept = kept_in

    def __call__(self, x: torch.Tensor, stages: list[torch.Tensor] | None = None,
                 first: SharedOutput | None = None, per_sample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept features and MACs per sample; where `stages` is a list, each layer's output
        averaged over positions is added to it, as in `PathTrace.stages`. With `first`, the
        first layer's output comes from there; with `per_sample`, the convolutions compute
        each sample's open channels only (`SampleChannels`)."""
        if per_sample:
            return self.per_sample(x, stages, first)
        active, count = torch.ones(len(x), self.in_channels, device=x.device), MacCount()
        x = channels_last(x) if first is None else x  # with `first`, only the first layer's gates read `x`
        for index, layer in enumerate(self.layers):
            if index == 2:
                x = x.flatten(1)
            if index == 0 and first is not None:
                x, active = layer.from_shared(x, active, count, first)
            else:
                pooled = index < 2  # channels-last max-pooling too is fastest at a multiple of 8 channels
                x, active = layer(x, active, count, keep_padding=pooled)
                # the next convolution reads a view of the kept channels
                x = pool_and_relu(x)[:, :layer.conv.out_channels] if pooled else F.relu(x)
            pool_stage(stages, x, layer.kept, layer.out_units)
        return x, count.total()

    def per_sample(self, x: torch.Tensor, stages: list[torch.Tensor] | None,
                   first: SharedOutput | None) -> tuple[torch.Tensor, torch.Tensor]:
        count, (conv1, conv2, linear) = MacCount(), self.layers
        if first is not None:
            channels = conv1.per_sample_from_shared(x, count, first)
        else:
            channels = conv1.per_sample(SampleChannels.of_images(x), count, then=pool_and_relu)
        pool_stage(stages, channels.pooled(), conv1.kept, conv1.out_units)
        channels = conv2.per_sample(channels, count, then=pool_and_relu)
        pool_stage(stages, channels.pooled(), conv2.kept, conv2.out_units)
        x, _ = linear(channels.spread().flatten(1), channels.active, count)
        x = F.relu(x)
        pool_stage(stages, x, linear.kept, linear.out_units)
        return x, count.total()


def residual_streams(network: PathResNet18, tasks: tuple[int, ...]) -> list[torch.Tensor]:
    """The channels of the residual stream after the stem and after each block: in each
    stage, every channel that a layer adding into the stream keeps (the stem or the stage's
    first block with its projection shortcut, then each block's second conv). With one set
    for the stage, an identity shortcut adds its input as it is: placing both sides on the
    union of their channels took up to twice as long as the convolutions around it (a
    channels-last tensor's channels are scattered one by one)."""
    stages = [[network.stem]]
    for block in network.blocks:
        if block.conv2.tied is not None:  # a projection shortcut starts a new stream
            stages.append([])
        stages[-1].append(block.conv2)
    return [stream for layers in stages
            for stream in [torch.unique(torch.cat([kept(layer, tasks) for layer in layers]))] * len(layers)]


class CompactBlock:
    """`PathBasicBlock` cut to its tasks' channels: from its input's `kept_in` to its
    output's `stream` (`residual_streams`, which an identity shortcut's input holds too)."""

    def __init__(self, block: PathBasicBlock, tasks: tuple[int, ...], kept_in: torch.Tensor, stream: torch.Tensor):
        self.out_units, self.kept = block.conv2.out_units, stream
        middle = kept(block.conv1, tasks)
        self.conv1 = CompactLayer(block.conv1, tasks, kept_in, middle)
        self.conv2 = CompactLayer(block.conv2, tasks, middle, stream)
        self.shortcut = None if block.conv2.tied is None else CompactConv(*block.conv2.tied, kept_in, stream)

    def __call__(self, x: torch.Tensor, active_in: torch.Tensor, count: MacCount) -> tuple[torch.Tensor, torch.Tensor]:
        """Output and its active channels; MACs per sample go to `count`."""
        h, mask1 = self.conv1(x, active_in, count)
        out, mask2 = self.conv2(F.relu(h), mask1, count)
        if self.shortcut is None:
            return F.relu(out + x), torch.maximum(mask2, active_in)
        count.add(active_in, mask2, out.shape[2] * out.shape[3])
        shortcut = self.shortcut(x)[:, :self.shortcut.out_channels]
        return F.relu(out + shortcut * mask2[:, :, None, None]), mask2

    def per_sample(self, x: SampleChannels, count: MacCount) -> SampleChannels:
        """As a call, on each sample's open channels only."""
        out = self.conv2.per_sample(self.conv1.per_sample(x, count, then=F.relu), count)
        if self.shortcut is None:  # each sample's channels of either side, the sum where both have them
            active = torch.maximum(out.active, x.active)
            index = open_first(active)
            summed = out.columns(index) + x.columns(index)
            return SampleChannels.of_columns(summed.relu_(), index, active, out.values.shape[2:])
        count.add(x.active, out.active, out.values.shape[2] * out.values.shape[3])
        shortcut = self.shortcut.per_sample(x, out.index) * out.active.gather(1, out.index).view(1, -1, 1, 1)
        return SampleChannels(F.relu(out.values + shortcut), out.index, out.active)


class CompactResNet18:
    """`PathResNet18` cut to its tasks' channels; `layers`: its `CompactLayer`s in forward
    order, as `CompactSmallCNN.layers`."""

    def __init__(self, network: PathResNet18, tasks: tuple[int, ...]):
        self.in_channels = network.in_channels
        streams = residual_streams(network, tasks)
        all_inputs = torch.arange(self.in_channels, device=network.stem.layer.weight.device)
        self.stem = CompactLayer(network.stem, tasks, all_inputs, streams[0])
        self.blocks = [CompactBlock(block, tasks, kept_in, stream)
                       for block, kept_in, stream in zip(network.blocks, streams, streams[1:])]
        self.kept = streams[-1]
        self.layers = [self.stem] + [conv for block in self.blocks for conv in (block.conv1, block.conv2)]

    def __call__(self, x: torch.Tensor, stages: list[torch.Tensor] | None = None,
                 first: SharedOutput | None = None, per_sample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept features and MACs per sample; where `stages` is a list, the output of the
        stem and of each block averaged over positions is added to it, as in
        `PathTrace.stages`. With `first`, the stem's output comes from there; with
        `per_sample`, the convolutions compute each sample's open channels only."""
        if per_sample:
            return self.per_sample(x, stages, first)
        count, active = MacCount(), torch.ones(len(x), self.in_channels, device=x.device)
        if first is not None:
            x, active = self.stem.from_shared(x, active, count, first)
        else:
            x, active = self.stem(channels_last(x), active, count)
            x = F.relu(x)
        pool_stage(stages, x, self.stem.kept, self.stem.out_units)
        for block in self.blocks:
            x, active = block(x, active, count)
            pool_stage(stages, x, block.kept, block.out_units)
        return positions_mean(x), count.total()

    def per_sample(self, x: torch.Tensor, stages: list[torch.Tensor] | None,
                   first: SharedOutput | None) -> tuple[torch.Tensor, torch.Tensor]:
        count = MacCount()
        if first is not None:
            channels = self.stem.per_sample_from_shared(x, count, first)
        else:
            channels = self.stem.per_sample(SampleChannels.of_images(x), count, then=F.relu)
        pool_stage(stages, channels.pooled(), self.stem.kept, self.stem.out_units)
        for block in self.blocks:
            channels = block.per_sample(channels, count)
            pool_stage(stages, channels.pooled(), block.kept, block.out_units)
        return channels.pooled(), count.total()


COMPACT_BACKBONES = {PathSmallCNN: CompactSmallCNN, PathResNet18: CompactResNet18}


def tensors_of(modules: list[nn.Module]) -> list[torch.Tensor]:
    """The modules' own tensors, and where a tensor is parametrised (ltp's soft
    thresholds), every tensor it is computed from. (A module is parametrised where it holds
    `parametrizations`: `parametrize.is_parametrized`'s test without its attribute lookup,
    which fails, slowly, on every module that is not.)"""
    own = [t for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
    computed_from = [t for m in modules if "parametrizations" in m._modules
                     for t in (*m.parametrizations.parameters(), *m.parametrizations.buffers())]
    return own + computed_from


version = operator.attrgetter("_version")


def tensor_state(tensors: list[torch.Tensor]) -> tuple[list[int], list[int]]:
    """Version counter and storage address of each tensor: a write in place changes the
    first, a storage put in the tensor's place (`.to()`) the second."""
    return list(map(version, tensors)), list(map(torch.Tensor.data_ptr, tensors))


class Registrations:
    """Counts every parameter, buffer and submodule assigned to any module, through
    PyTorch's global registration hooks: a path holds the tensors it was cut from, and
    one assigned in a tensor's place (or a module in a module's, or a parametrisation
    attached) would not be among them. Counting every assignment anywhere rebuilds paths
    for nothing where other networks are built meanwhile, never too rarely. Left out:
    the graphs torch.compile builds of a compiled path (`TaskPathNet.compile_compact`),
    which would make the path they run out of date on its first pass."""

    count = 0

    @classmethod
    def add(cls, module: nn.Module, *_) -> None:
        if not isinstance(module, torch.fx.GraphModule):
            cls.count += 1


for register in (nn.modules.module.register_module_parameter_registration_hook,
                 nn.modules.module.register_module_buffer_registration_hook,
                 nn.modules.module.register_module_module_registration_hook):
    register(Registrations.add)


def kernel_modules(model: TaskPathNet) -> list[nn.Module]:
    """The masked layers' kernels (and batch norms), which every task's path is cut from."""
    return [m for layer in model.path_layers for m in layer.kernel_modules()]


def computed_macs(model: TaskPathNet, kept_out: list[int]) -> int:
    """MACs per sample of a compact path whose layers keep `kept_out` output channels (in
    the order of `model.path_layers`) with every channel open, as its layers compute them
    (a convolution's outputs padded to CHANNEL_MULTIPLE); estimated: each layer reads the
    channels the layer before it keeps (a ResNet stage's residual stream can hold more),
    and the gates and projection shortcuts are left out."""
    macs, channels, units = 0, model.backbone.in_channels, model.backbone.in_channels
    for layer, count in zip(model.path_layers, kept_out):
        padding = -count % CHANNEL_MULTIPLE if isinstance(layer.layer, nn.Conv2d) else 0
        macs += channels * (layer.in_units // units) * (count + padding) * layer.pair_macs * layer.positions
        channels, units = count, layer.out_units
    return macs


class CompactPath:
    """A compact path and head: one task's, or several tasks' run as one (`stacked`); the
    heads' inputs cut to the features the path keeps. `is_current()` tells whether it
    still matches the network it was cut from."""

    def __init__(self, model: TaskPathNet, tasks: tuple[int, ...]):
        self.tasks = tasks
        heads = [model.heads[task] for task in tasks]
        own_sources = list(dict.fromkeys(m for task in tasks for m in model.task_modules(task)))  # each once
        # Found once, not walked on every pass, which cost a share of a small batch's pass
        # (`benchmarks/batch_thresholds.py`); `Registrations` sees any tensor replaced.
        self.sources = tensors_of(kernel_modules(model) + own_sources)
        self.state, self.registrations = tensor_state(self.sources), Registrations.count
        # Held, so that no tensor made later can take these storage addresses.
        self.storage = [t.detach() for t in self.sources]
        self.backbone = COMPACT_BACKBONES[type(model.backbone)](model.backbone, tasks)
        # With `TaskPathNet.compile_compact`, torch.compile fuses the path's many small
        # operations (the gates', the mask multiplications) into fewer kernels, on its
        # first pass at each batch size (seconds to minutes; a C++ compiler on CPU).
        self.run_backbone = torch.compile(self.backbone.__call__) if model.compile_compact else self.backbone
        self.heads = [(head.weight.detach()[:, self.backbone.kept], head.bias.detach()) for head in heads]
        # The MACs per sample the tasks' paths run as one (`stacked`) compute beyond running each alone.
        self.extra_macs = 0
        if len(tasks) > 1:
            masks = [kept_by_task(layer, tasks) for layer in model.path_layers]
            together = computed_macs(model, [int(mask.any(0).sum()) for mask in masks])
            by_task = zip(*(mask.sum(1).tolist() for mask in masks))  # each task's count per layer
            apart = sum(computed_macs(model, counts) for counts in by_task)
            self.extra_macs = len(tasks) * together - apart
        self.head_macs = sum(head.in_features * head.out_features for head in heads)
        self.out_features = model.backbone.out_features
        self.first_layer = model.path_layers[0]
        self.shared_first = None  # (the paths, their SharedFirstLayer), set by `run_learned_paths` or `stacked`

    @cached_property
    def stacked_heads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`stacked`'s heads as one batched product: weights (tasks x features x classes)
        and biases (tasks x 1 x classes), zero-padded to the widest head."""
        classes = max(len(bias) for _, bias in self.heads)
        return (torch.stack([F.pad(weight, (0, 0, 0, classes - len(weight))).t() for weight, _ in self.heads]),
                torch.stack([F.pad(bias, (0, classes - len(bias))) for _, bias in self.heads])[:, None])

    def is_current(self) -> bool:
        """Whether the path matches the network it was cut from."""
        return Registrations.count == self.registrations and tensor_state(self.sources) == self.state

    def __call__(self, x: torch.Tensor, per_sample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One task's logits and MACs per sample; with `per_sample` (`TaskPathNet.runs_per_sample`),
        each sample's open channels computed only (`SampleChannels`)."""
        features, macs = self.run_backbone(x, per_sample=per_sample)
        return F.linear(features, *self.heads[0]), macs + self.head_macs

    def features_and_logits(self, x: torch.Tensor, stages: bool = False, first: SharedOutput | None = None,
                            per_sample: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One task's features (all of them, those cut away zero), or with `stages` every
        stage's output averaged over positions (`PathTrace.stages`); logits and MACs per
        sample. With `first`, the first layer's output comes from there; `per_sample` as
        in a call."""
        pooled = [] if stages else None
        features, macs = self.run_backbone(x, pooled, first, per_sample)
        logits = F.linear(features, *self.heads[0])
        return self.read(features, pooled), logits, macs + self.head_macs

    def stacked(self, x: torch.Tensor,
                stages: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Every task's path as one, on `x` repeated once per task: the paths' convolutions
        over the union of the channels the tasks keep, each chunk masked by its task's
        masks (`PathLayer.compact_mask`), the first one computed once (`SharedFirstLayer`),
        the heads as one batched product. What each task's features give the task
        classifier (as `features_and_logits`), each task's logits, and the MACs per sample
        of all, each path's counted as it alone would be. A few large operations instead
        of each path's many small ones: faster on small batches
        (`benchmarks/batch_thresholds.py`)."""
        if self.shared_first is None:
            self.shared_first = [self], SharedFirstLayer(self.first_layer, [self])
        pooled = [] if stages else None
        repeated = torch.cat([x] * len(self.tasks))  # `repeat` would lose the channels-last layout
        features, macs = self.run_backbone(repeated, pooled, self.shared_first[1](x))
        weight, bias = self.stacked_heads
        logits = torch.baddbmm(bias, features.view(len(self.tasks), len(x), -1), weight)
        logits = [task_logits[:, :len(head_bias)] for task_logits, (_, head_bias) in zip(logits, self.heads)]
        return list(self.read(features, pooled).chunk(len(self.tasks))), logits, \
            macs.view(len(self.tasks), -1).sum(0) + self.head_macs

    def read(self, features: torch.Tensor, pooled: list[torch.Tensor] | None) -> torch.Tensor:
        """What the task classifier reads: the stages' outputs, or the features."""
        return torch.cat(pooled, 1) if pooled is not None else widen(features, self.backbone.kept, self.out_features)


@dataclass
class SharedOutput:
    """What `SharedFirstLayer` computed for a batch: its output over the union of the
    paths' channels, where each path's first layer finds its own (`positions`), and the
    convolution's output positions (for counting MACs)."""

    out: torch.Tensor
    positions: dict[CompactLayer, torch.Tensor]
    spatial: int


class SharedFirstLayer:
    """The first layer of every learned task's compact path in the class setting, run once
    for all: every path reads the same input, so their convolutions are computed together
    over the union of the channels the tasks keep, with what follows up to the mask (the
    small CNN's max-pooling, and the ReLU, which commute with a mask >= 0). Each path then
    takes its own channels and multiplies its mask. Outputs as those of the separate
    paths up to the rounding of float sums; MACs counted per path, as the masked layers
    count them (the paper's count)."""

    def __init__(self, layer: PathLayer, paths: list[CompactPath]):
        firsts = [path.backbone.layers[0] for path in paths]
        union = torch.unique(torch.cat([first.kept for first in firsts]))
        self.conv = CompactConv(layer.layer, layer.norm, torch.arange(layer.in_units, device=union.device), union)
        self.positions = {first: torch.searchsorted(union, first.kept) for first in firsts}
        self.pool = isinstance(paths[0].backbone, CompactSmallCNN)

    def __call__(self, x: torch.Tensor) -> SharedOutput:
        out = self.conv(channels_last(x))
        spatial = out.shape[2] * out.shape[3]
        return SharedOutput(pool_and_relu(out) if self.pool else F.relu(out), self.positions, spatial)


def run_learned_paths(paths: list[CompactPath], x: torch.Tensor, stages: bool,
                      per_sample: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """`TaskPathNet.learned_paths` with compact paths: what the task classifier reads of
    each path, each path's logits and the MACs of all, the paths' first layer shared
    (`SharedFirstLayer`, kept with the first path until any path is rebuilt); `per_sample`
    as in a `CompactPath` call."""
    cached = paths[0].shared_first
    if cached is None or len(cached[0]) != len(paths) or any(a is not b for a, b in zip(cached[0], paths)):
        paths[0].shared_first = cached = paths, SharedFirstLayer(paths[0].first_layer, paths)
    first = cached[1](x)
    features, logits, macs = zip(*(path.features_and_logits(x, stages, first, per_sample) for path in paths))
    return list(features), list(logits), sum(macs)

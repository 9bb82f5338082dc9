"""Post-training quantisation after every task, simulated with torch.ao.quantization's
fake quantisation so that every bit width runs on a CPU.

Weights: symmetric (zero point 0, PyTorch's default for weights: integer kernels then need
no zero-point cross terms), per output channel or per tensor, from the weights' min/max.
Activations: the input of every quantised layer, affine per tensor (post-ReLU inputs are
non-negative, and an affine range spends no level on values that never occur), its range
calibrated on a few shuffled batches of the latest task's training data passed through
every task's path and head. Biases stay float (int32 in integer kernels).

Which layers: every nn.Conv2d and nn.Linear, heads and the task classifier included; in
ccgn and HAT (`TaskPathNet`) the conv/linear layer each `PathLayer` wraps, while the
gating modules (ccgn's gate MLPs, HAT's embeddings) stay float and read float inputs.
Quantised ccgn/HAT copies run their masked layers instead of compact paths, which cut
the weights outside the modules and would bypass the activation quantisers; function
and executed MACs are the same.

Model size in bits: every quantised weight at the variant's bit width, every other
parameter and buffer as stored (float32: 32 bits).

With ltp attached, the network quantised is the one evaluated, its weights through their
soft thresholds (not ltp's hard-pruned variant).

Data-free quantisation (`dfq`, Nagel et al. 2019, arXiv:1906.04721) before quantising:
cross-layer equalisation, then bias correction. Equalisation uses
`torch.ao.quantization._equalize.cross_layer_equalization` (scale s = sqrt(r1/r2) per
channel, r the max-min range: the paper's sqrt(r1 r2)/r2), swept over the pairs until the
weights stop changing; a linear layer after a flatten is equalised as a 1-d conv over the
flattened map (each channel owns `spatial` consecutive input columns). It applies only
to conv/linear layers separated by ReLU and max-pool alone (which commute with positive
per-channel scales): on the baselines' small_cnn, conv1-conv2 and conv2-fc; on their
resnet18, conv1-conv2 inside each residual block, once every batch norm is folded into
the convolution before it, as the paper does (resnet18's other pairs straddle a residual
addition, which a per-channel scale does not commute with). So on resnet18 the `_dfq`
variants quantise the folded convolutions, the plain ones the unfolded convolutions with
their batch norms left float after them. Not on ccgn/HAT, whose gates read each layer's
input, which equalisation rescales: `dfq` there is an error. Bias correction subtracts
each layer's expected output error E[dW x] = dW E[x] from its bias; the small CNN has no
batch norm to give E[x] data-free, so E[x] is the empirical mean of the layer's float
input on the calibration batches (conv: per input channel, padding ignored), on resnet18
as well. The paper authors' implementation is AIMET (aimet-torch): not
used, as it is not installed here and is a heavy dependency for two steps.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from avalanche.models import MultiTaskModule
from avalanche.models.utils import avalanche_forward
from pydantic import Field, field_validator
from torch import nn
from torch.ao.quantization import FakeQuantize, MinMaxObserver, PerChannelMinMaxObserver
from torch.ao.quantization._equalize import cross_layer_equalization
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.data import DataLoader, Dataset

from clbench.errors import UserError
from clbench.models import BasicBlock, model_size_bytes, unparametrise
from clbench.path_network import PathLayer, TaskPathNet
from clbench.registry import Module, ModuleOptions, Variant, register_module

CALIBRATION_BATCH = 64
EQUALISATION_SWEEPS = 100  # at most; sweeps stop once no weight moves by more than 1e-6 relative
BETWEEN_EQUALISED = (nn.ReLU, nn.MaxPool2d, nn.Flatten)


def weight_quantiser(bits: int, granularity: str) -> FakeQuantize:
    """Symmetric signed `bits`-bit fake quantisation, per output channel or per tensor."""
    per_channel = granularity == "per_channel"
    return FakeQuantize(observer=PerChannelMinMaxObserver if per_channel else MinMaxObserver,
                        quant_min=-(2 ** (bits - 1)), quant_max=2 ** (bits - 1) - 1, dtype=torch.qint8,
                        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
                        **({"ch_axis": 0} if per_channel else {}))


def quantised_weight(weight: torch.Tensor, bits: int, granularity: str) -> torch.Tensor:
    """`weight` rounded to its `bits`-bit grid (at most 2**bits values per channel or tensor)."""
    return weight_quantiser(bits, granularity).to(weight.device)(weight.detach())


def activation_quantiser(bits: int) -> FakeQuantize:
    """Affine unsigned `bits`-bit fake quantisation per tensor; observes until calibrated."""
    quantiser = FakeQuantize(observer=MinMaxObserver, quant_min=0, quant_max=2 ** bits - 1, dtype=torch.quint8,
                             qscheme=torch.per_tensor_affine)
    quantiser.disable_fake_quant()
    return quantiser


def quantised_layers(model: nn.Module) -> list[nn.Conv2d | nn.Linear]:
    """Every conv and linear layer except those of the gating modules inside `PathLayer`s."""
    gating = {id(m) for path_layer in model.modules() if isinstance(path_layer, PathLayer)
              for child in path_layer.children() if child not in (path_layer.layer, path_layer.norm, path_layer.tied)
              for m in child.modules()}
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in gating]


@torch.no_grad()
def fold_batch_norms(model: nn.Module) -> nn.Module:
    """`model` (in evaluation mode) with each batch norm folded into the convolution before
    it, which gains a bias, and replaced by an identity: the same function at test."""
    for module in list(model.modules()):
        if isinstance(module, BasicBlock):
            module.conv1, module.bn1 = fuse_conv_bn_eval(module.conv1, module.bn1), nn.Identity()
            module.conv2, module.bn2 = fuse_conv_bn_eval(module.conv2, module.bn2), nn.Identity()
        elif isinstance(module, nn.Sequential):
            for index in range(len(module) - 1):
                if isinstance(module[index], nn.Conv2d) and isinstance(module[index + 1], nn.BatchNorm2d):
                    module[index] = fuse_conv_bn_eval(module[index], module[index + 1])
                    module[index + 1] = nn.Identity()
    return model


def equalisation_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """Consecutive conv/linear layers of an nn.Sequential with only ReLU, max-pool and
    flatten between them, a ReLU among those; and the two convolutions of each residual
    block whose batch norms are folded (`fold_batch_norms`)."""
    pairs = [(block.conv1, block.conv2) for block in model.modules()
             if isinstance(block, BasicBlock) and isinstance(block.bn1, nn.Identity)]
    for sequence in model.modules():
        if not isinstance(sequence, nn.Sequential):
            continue
        layers = list(sequence)
        for index, first in enumerate(layers):
            if type(first) not in (nn.Conv2d, nn.Linear):
                continue
            rest = layers[index + 1:]
            between = next((n for n, m in enumerate(rest) if not isinstance(m, BETWEEN_EQUALISED)), len(rest))
            if between < len(rest) and type(rest[between]) in (nn.Conv2d, nn.Linear) and \
                    any(isinstance(m, nn.ReLU) for m in rest[:between]):
                pairs.append((first, rest[between]))
    return pairs


@torch.no_grad()
def equalise_pair(first: nn.Module, second: nn.Module) -> None:
    if isinstance(first, nn.Conv2d) and isinstance(second, nn.Linear):  # through a flatten
        channels = first.out_channels
        flattened = torch.nn.utils.skip_init(nn.Conv1d, channels, second.out_features,
                                             second.in_features // channels, bias=False, device=second.weight.device)
        flattened.weight = nn.Parameter(second.weight.view(second.out_features, channels, -1).clone())
        cross_layer_equalization(first, flattened)
        second.weight = nn.Parameter(flattened.weight.reshape(second.weight.shape).clone())
    else:
        cross_layer_equalization(first, second)


def equalise(model: nn.Module) -> None:
    """Cross-layer equalisation of every pair of `equalisation_pairs`, in place."""
    pairs = equalisation_pairs(model)
    for _ in range(EQUALISATION_SWEEPS):
        before = [first.weight.detach().clone() for first, _ in pairs]
        for first, second in pairs:
            equalise_pair(first, second)
        if all(torch.allclose(old, first.weight, rtol=1e-6, atol=0) for old, (first, _) in zip(before, pairs)):
            return


def channel_means(x: torch.Tensor) -> torch.Tensor:
    """Mean of a layer input per input channel (conv) or unit (linear)."""
    return x.mean(dim=(0, 2, 3)) if x.dim() == 4 else x.mean(dim=0)


@torch.no_grad()
def correct_bias(layer: nn.Conv2d | nn.Linear, float_weight: torch.Tensor, input_mean: torch.Tensor) -> None:
    """Subtract the expected output error of the quantised weights, (W_q - W) E[x], from the bias."""
    error = layer.weight - float_weight
    if error.dim() == 4:
        error = error.sum(dim=(2, 3))
    layer.bias -= error @ input_mean


def calibration_batches(data: Dataset, examples: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `examples` of `data` in a fixed shuffled order (the run's random state untouched)."""
    loader = DataLoader(data, batch_size=CALIBRATION_BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches, seen = [], 0
    for x, _, t in loader:
        batches.append((x.to(device), t.to(device)))
        seen += len(x)
        if seen >= examples:
            break
    return batches


@torch.no_grad()
def calibrate(model: nn.Module, batches, n_tasks: int) -> None:
    """Run the calibration batches through every task's path and head, then as evaluated."""
    for x, t in batches:
        if isinstance(model, MultiTaskModule):
            for task in range(n_tasks):
                model.forward_single_task(x, task)
        avalanche_forward(model, x, t)


def quantise(model: nn.Module, bits: int, granularity: str, batches, n_tasks: int, bias_correction: bool) -> Variant:
    """`model` (a copy) with its layers' inputs and weights fake-quantised, in place."""
    model.eval()
    if isinstance(model, TaskPathNet):
        model.compact_inference = False
    device = next(model.parameters()).device
    layers = quantised_layers(model)
    quantisers = {layer: activation_quantiser(bits).to(device) for layer in layers}
    input_means = {layer: [0, 0] for layer in layers}  # sum of batch means, batches

    def record_mean(layer, inputs):
        input_means[layer][0] += channel_means(inputs[0])
        input_means[layer][1] += 1

    for layer in layers:
        layer.register_forward_pre_hook(lambda layer, inputs: (quantisers[layer](inputs[0]), *inputs[1:]))
    recorders = [layer.register_forward_pre_hook(record_mean) for layer in layers]
    calibrate(model, batches, n_tasks)
    for recorder in recorders:
        recorder.remove()
    with torch.no_grad():
        for layer in layers:
            quantisers[layer].disable_observer()
            quantisers[layer].enable_fake_quant()
            float_weight = layer.weight.detach().clone()
            layer.weight.copy_(quantised_weight(float_weight, bits, granularity))
            if bias_correction and layer.bias is not None:
                total, count = input_means[layer]
                correct_bias(layer, float_weight, total / count)
    return Variant(model, quantised_measures(model, [layer.weight for layer in layers], bits))


def quantised_measures(model: nn.Module, weights: list[torch.Tensor], bits: int) -> dict[str, float]:
    """A variant's measures: its size in bits with `weights` at `bits` bits and every other
    parameter and buffer as stored, and the share of those weights that are zero."""
    size_bits = model_size_bytes(model) * 8 - sum(w.numel() * (w.element_size() * 8 - bits) for w in weights)
    sparsity = sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)
    return {"model_size_bits": size_bits, "sparsity": sparsity}


@register_module
class PostTrainingQuantisation(Module):
    """Post-training quantisation after every task (weights and layer inputs at each bit
    width, per channel or per tensor, simulated), optionally after data-free quantisation
    (cross-layer equalisation and bias correction): one variant per bit width and
    granularity, named w<bits>a<bits>_<granularity>[_dfq]."""

    name = "ptq"

    class Options(ModuleOptions):
        bits: list[int] = Field([8, 6, 4], min_length=1, description="bit widths, each of weights and activations (2-8)")
        granularity: list[Literal["per_channel", "per_tensor"]] = Field(
            ["per_channel", "per_tensor"], min_length=1, description="weight quantisation granularities")
        dfq: bool = Field(False, description="data-free quantisation first: cross-layer equalisation, bias correction "
                                             "(baselines only)")
        calibration_examples: int = Field(256, gt=0, description="training examples of the latest task that "
                                                                 "calibrate activation ranges (and dfq's input means)")

        @field_validator("bits")
        @classmethod
        def simulated_widths(cls, bits: list[int]) -> list[int]:
            if not all(2 <= b <= 8 for b in bits):
                raise ValueError("each bit width must be 2 to 8 (fake quantisation on 8-bit integer types)")
            return bits

    def check_model(self, model: nn.Module) -> None:
        if self.options.dfq and (isinstance(model, TaskPathNet) or
                                 not equalisation_pairs(fold_batch_norms(copy.deepcopy(model).eval()))):
            raise UserError("ptq's dfq needs conv/linear layers with only ReLU and max-pool (or a batch norm, "
                            "folded) between them, as in the baselines' small_cnn and resnet18: not ccgn/HAT "
                            "(their gates read the inputs equalisation rescales)")

    def variants(self, model: nn.Module, calibration: Dataset, n_tasks: int) -> dict[str, Variant]:
        base = unparametrise(copy.deepcopy(model)).eval()  # with ltp: the soft-thresholded weights as evaluated
        if self.options.dfq:
            equalise(fold_batch_norms(base))
        batches = calibration_batches(calibration, self.options.calibration_examples, next(model.parameters()).device)
        suffix = "_dfq" if self.options.dfq else ""
        return {f"w{bits}a{bits}_{granularity}{suffix}":
                quantise(copy.deepcopy(base), bits, granularity, batches, n_tasks, self.options.dfq)
                for bits in self.options.bits for granularity in self.options.granularity}

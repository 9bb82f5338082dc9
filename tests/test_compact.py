"""Compact execution at test (`clbench.compact`): the same outputs and MACs as the
masked layers, never out of date, never where gradients or training need the masked
layers; and the benchmark that times it."""

import copy
import math
import pickle
import shutil
from unittest import mock

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import load_script, train_tasks
from torch import nn

from clbench import compact, path_network
from clbench.compact import CHANNEL_MULTIPLE, computed_macs
from clbench.config import RunConfig
from clbench.gates import GatedLayer
from clbench.models import ModelSpec
from clbench.path_network import OFF_TASK_PENALTY, STACKED, TaskPathNet
from clbench.registry import get_strategy
from clbench.runner import run


def learned_model(strategy: str, backbone: str, setting: str, hparams: dict | None = None,
                  task_classes: tuple = ((0, 1), (2, 3), (4, 5))) -> nn.Module:
    """A width-8 network of three tasks as after learning the first two, set by hand:
    batch norms hold the statistics of `inputs()` (so the signal neither dies nor
    explodes) and affine parameters away from their initial ones; then ccgn's tasks may
    open 40% of each layer's kernels, HAT's masks are exactly 0 for 40% of the channels,
    1 for most others and fractional for the rest; task 2 keeps nothing of the second layer
    (nor, on ResNet-18, of the third, which adds into the residual stream)."""
    torch.manual_seed(0)
    spec = ModelSpec(backbone, 8, (1, 28, 28), setting, [list(classes) for classes in task_classes])
    model = get_strategy(strategy).from_hparams(hparams or {}).make_model(spec)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for norm in norms:
            norm.momentum = None  # a cumulative average over the three tasks' passes
        for task in range(3):
            model.forward_path(inputs()[0], task)
        for norm in norms:
            norm.momentum = 0.1
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
        for layer in model.path_layers:
            if isinstance(layer, GatedLayer):
                for task in range(2):
                    layer.freeze(task, torch.rand(layer.out_units) < 0.4)
            else:
                embedding = layer.embedding.weight
                kind = torch.rand(embedding.shape)
                embedding.copy_(torch.where(kind < 0.4, -1.0, torch.where(kind < 0.85, 1.0, 0.005 * torch.randn_like(embedding))))
        for nothing in model.path_layers[1:3 if backbone == "resnet18" else 2]:
            if isinstance(nothing, GatedLayer):
                nothing.allowed[1] = False
            else:
                nothing.embedding.weight[1] = -1.0
    model.tasks_learned = 2
    return model.eval()


def inputs(batch: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ccgn's gates tell apart, and task labels of learned and unlearned tasks."""
    x = torch.randn(batch, 1, 28, 28) + torch.linspace(-2, 2, batch).view(-1, 1, 1, 1)
    return x, torch.arange(batch) % 3


@torch.no_grad()
def compact_and_masked(model, x, tasks):
    """forward_with_macs with compact paths, then with the masked layers."""
    compact = model.forward_with_macs(x, tasks)
    model.compact_inference = False
    masked = model.forward_with_macs(x, tasks)
    model.compact_inference = True
    return compact, masked


def run_as_one(model, up_to: int) -> None:
    """The class setting's paths run as one on batches of up to `up_to`, whatever MACs
    their union adds (0: never)."""
    model.stacked_paths_max_batch, model.stacked_layer_macs = up_to, math.inf


@torch.no_grad()
def keep_thirds(model, third) -> None:
    """ccgn's three tasks each allowed a third of every layer's kernels: task t the
    kernels k with k % 3 == third(t)."""
    for layer in model.path_layers:
        for task in range(3):
            layer.allowed[task] = torch.arange(layer.out_units) % 3 == third(task)


@torch.no_grad()
def change_task_mask(layer, task: int) -> None:
    """Change `task`'s mask in `layer`: ccgn's gating module, or HAT's embedding."""
    if isinstance(layer, GatedLayer):
        layer.gates[task][0].weight.mul_(2)
    else:
        layer.embedding.weight[task].neg_()


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("setting", ["task", "class"])
@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])
@pytest.mark.parametrize("strategy", ["ccgn", "hat"])
def test_compact_paths_compute_what_the_masked_layers_do(strategy, backbone, setting, per_sample):
    """Outputs within float tolerance and the same MACs per sample, in a batch whose
    samples open different channels (ccgn) and in the class setting, where every learned
    task's path runs (each on its own here; as one: `test_stacked_paths_...`); and the
    paths are smaller than the network. Computing each sample's open channels
    (`per_sample_channels`, here from a batch of 2) or one set for the batch alike."""
    model = learned_model(strategy, backbone, setting)
    model.per_sample_channels, model.backbone.per_sample_from_batch, model.stacked_paths_max_batch = per_sample, 2, 0
    x, tasks = inputs()
    (compact, compact_macs), (masked, masked_macs) = compact_and_masked(model, x, tasks)
    assert torch.allclose(compact, masked, atol=1e-5)
    assert torch.equal(compact_macs, masked_macs)
    assert sorted(model._compact_paths) == ([0, 1, 2] if setting == "task" else [0, 1])
    path = model._compact_paths[0].backbone
    convs = [layer.conv for layer in path.layers if layer.conv.conv is not None]
    assert all(len(conv.weight) % CHANNEL_MULTIPLE == 0 for conv in convs), "convolutions should compute padded outputs"
    assert any(len(conv.weight) > conv.out_channels for conv in convs), "some convolution should need padding"
    cut = [layer.conv.out_channels for layer in path.layers]
    assert any(n < layer.out_units for n, layer in zip(cut, model.path_layers)), "the path should be cut"
    with torch.no_grad():
        logits, trace = model.forward_path(x, 0)
    assert logits.std(0).min() > 1e-3, "outputs should differ between samples by more than the tolerance"
    if strategy == "ccgn":
        assert any((mask != mask[0]).any() for mask in trace.masks), "samples should open different channels"
    else:
        fractional = torch.cat(trace.masks, 1)[0]
        assert ((fractional > 0) & (fractional < 1)).any(), "some attention should be fractional"


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])
@pytest.mark.parametrize("strategy", ["ccgn", "hat_tc"])
def test_compact_paths_give_a_task_classifier_reading_every_stage_what_the_masked_layers_do(strategy, backbone,
                                                                                           stacked):
    model = learned_model(strategy, backbone, "class", {"classifier_layers": "all"})
    run_as_one(model, 100 if stacked else 0)
    x, tasks = inputs()
    with torch.no_grad():
        compact_read, _, _ = model.learned_paths(x)
        model.compact_inference = False
        masked_read, _, _ = model.learned_paths(x)
        model.compact_inference = True
    assert [r.shape for r in masked_read] == [(len(x), model.backbone.stage_features)] * 2
    assert all(torch.allclose(c, m, atol=1e-5) for c, m in zip(compact_read, masked_read))
    assert all(r.std(0).max() > 1e-3 for r in masked_read), "what the classifier reads should differ between samples"
    (compact, _), (masked, _) = compact_and_masked(model, x, tasks)
    assert torch.allclose(compact, masked, atol=1e-5)


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])
@pytest.mark.parametrize("strategy", ["ccgn", "hat"])
def test_stacked_paths_compute_what_the_masked_layers_do(strategy, backbone):
    """The class setting's paths run as one (here at every batch): the union
    of the tasks' channels, each chunk masked by its own task (ccgn's gates closed on
    what the task may not open), and each path's MACs as the masked layers count them;
    rebuilt when one task's mask changes, and when another task is learned. Above
    `stacked_paths_max_batch`, each path runs on its own. Heads of different widths run
    as one."""
    model = learned_model(strategy, backbone, "class", task_classes=((0, 1), (2, 3, 4), (5, 6)))
    x, tasks = inputs()
    run_as_one(model, len(x))
    (stacked, stacked_macs), (masked, masked_macs) = compact_and_masked(model, x, tasks)
    assert torch.allclose(stacked, masked, atol=1e-5)
    assert torch.equal(stacked_macs, masked_macs)
    path = model._compact_paths[STACKED]
    assert list(model._compact_paths) == [STACKED] and path.tasks == (0, 1)
    kept = {layer: layer.kept_channels(0) | layer.kept_channels(1) for layer in model.path_layers}
    if backbone == "resnet18":  # in each stage, the layers adding into the residual stream keep what any of them keeps
        stem, blocks = model.backbone.stem, model.backbone.blocks
        for stage in ([stem, blocks[0].conv2, blocks[1].conv2], *([blocks[i].conv2, blocks[i + 1].conv2]
                                                                   for i in (2, 4, 6))):
            stream = torch.stack([kept[layer] for layer in stage]).any(0)
            kept.update(dict.fromkeys(stage, stream))
    for layer, cut in zip(model.path_layers, path.backbone.layers):
        assert torch.equal(cut.kept, kept[layer].nonzero().flatten())
    assert any(len(cut.kept) < layer.out_units for cut, layer in zip(path.backbone.layers, model.path_layers))
    change_task_mask(model.path_layers[2], 1)
    (stacked, _), (masked, _) = compact_and_masked(model, x, tasks)
    assert torch.allclose(stacked, masked, atol=1e-5)
    assert model._compact_paths[STACKED] is not path
    model.tasks_learned = 3  # no tensor changed
    (stacked, stacked_macs), (masked, masked_macs) = compact_and_masked(model, x, tasks)
    assert torch.allclose(stacked, masked, atol=1e-5) and torch.equal(stacked_macs, masked_macs)
    assert model._compact_paths[STACKED].tasks == (0, 1, 2)
    model.stacked_paths_max_batch = len(x) - 1
    compact_and_masked(model, x, tasks)
    assert sorted(key for key in model._compact_paths if key != STACKED) == [0, 1, 2]


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])
def test_paths_run_as_one_where_the_macs_their_union_adds_cost_less_than_their_layers(backbone):
    """The paths run as one where the MACs they compute beyond running each alone
    (`CompactPath.extra_macs`), over the batch, are at most `stacked_layer_macs` for each
    layer and path saved: at no cost per layer where three tasks keep the same channels
    (no MACs beyond), where they keep a third each only within that budget; and never on
    a batch above `stacked_paths_max_batch`."""
    model = learned_model("ccgn", backbone, "class")
    model.tasks_learned = 3
    x, tasks = inputs(16)
    model.stacked_paths_max_batch = len(x)

    def runs_as_one(third, layer_macs: float) -> bool:
        keep_thirds(model, third)
        model.stacked_layer_macs = layer_macs
        model._compact_paths.clear()
        (compact, compact_macs), (masked, masked_macs) = compact_and_masked(model, x, tasks)
        assert torch.allclose(compact, masked, atol=1e-5) and torch.equal(compact_macs, masked_macs)
        return not any(key in model._compact_paths for key in range(3))

    assert runs_as_one(lambda task: 0, 0) and model.compact_paths([(0, 1, 2)])[0].extra_macs == 0
    assert not runs_as_one(lambda task: task, 0)
    extra = model.compact_paths([(0, 1, 2)])[0].extra_macs
    budget = len(x) * extra / (2 * len(model.path_layers))  # two paths saved
    assert extra > 0 and runs_as_one(lambda task: task, budget * 1.001)
    assert not runs_as_one(lambda task: task, budget * 0.999)
    model.stacked_paths_max_batch = len(x) - 1
    assert not runs_as_one(lambda task: 0, math.inf)


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])
def test_computed_macs_count_each_layers_output_positions_and_the_compact_weights(backbone):
    """`PathLayer.positions` are each masked layer's output positions; on the small CNN,
    whose layers each read the one before, `computed_macs` is each compact layer's
    weights (padded outputs included) times its positions, for one task or several; and
    the paths as one compute the MACs of their union once per task beyond the paths'."""
    model = learned_model("ccgn", backbone, "class")
    positions = {}

    def record(layer):
        return lambda _, __, out: positions.update({layer: out[0, 0].numel()})

    hooks = [layer.layer.register_forward_hook(record(layer)) for layer in model.path_layers]
    with torch.no_grad():
        model.forward_path(inputs()[0], 0)
    for hook in hooks:
        hook.remove()
    assert positions == {layer: layer.positions for layer in model.path_layers}
    assert len(set(positions.values())) == (3 if backbone == "small_cnn" else 4)
    if backbone == "small_cnn":  # three tasks keeping a third of each layer each
        keep_thirds(model, lambda task: task)
        model.tasks_learned = 3

        def weights(tasks: tuple[int, ...]) -> int:
            path = model.compact_paths([tasks])[0].backbone
            computed = sum(cut.conv.weight.numel() * layer.positions
                           for cut, layer in zip(path.layers, model.path_layers))
            assert computed_macs(model, [len(cut.kept) for cut in path.layers]) == computed
            return computed

        apart = sum(weights((task,)) for task in range(3))
        assert model.compact_paths([(0, 1, 2)])[0].extra_macs == 3 * weights((0, 1, 2)) - apart > 0


def test_class_scores_are_each_tasks_log_softmax_lowered_where_the_task_classifier_picked_another():
    """Each learned task's classes (in any order of class ids) score its head's
    log-softmax, lowered by OFF_TASK_PENALTY for the samples whose picked task is
    another; the classes of tasks not learned yet score -inf."""
    model = learned_model("ccgn", "small_cnn", "class")
    model.task_classes = [[3, 0], [5, 1], [2, 4]]
    x, _ = inputs()
    with torch.no_grad():
        features, _, _ = model.learned_paths(x)
        margin = model.classify_task(torch.cat(features, 1)).diff(dim=1).squeeze(1)  # task 1's logit over task 0's
        model.task_classifier[-1].bias[0] += margin.median()  # about half the samples pick each
        scores, _ = model.forward_with_macs(x, torch.zeros(len(x), dtype=torch.long))
        features, logits, _ = model.learned_paths(x)
        picked = model.classify_task(torch.cat(features, 1)).argmax(1)
    assert set(picked.tolist()) == {0, 1}, "the samples should pick both learned tasks"
    for task, classes in enumerate(model.task_classes[:2]):
        lowered = OFF_TASK_PENALTY * (picked != task).float()
        assert torch.allclose(scores[:, classes], F.log_softmax(logits[task], 1) - lowered[:, None])
    assert torch.isneginf(scores[:, model.task_classes[2]]).all()


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])
def test_per_sample_channels_run_each_samples_open_channels_where_gates_differ(backbone):
    """ccgn from a batch of `per_sample_from_batch`: every convolution reads and computes
    per sample only channels that sample's gates opened, as many as the most any sample
    opens (not all the task keeps), and gives the masked layers' outputs; a smaller
    batch, and HAT, whose masks are the same for every sample, run the kept channels
    instead."""
    model = learned_model("ccgn", backbone, "task")
    x, tasks = inputs()
    model.backbone.per_sample_from_batch = len(x)
    calls = []
    convolution = compact.CompactConv.per_sample

    def spy(conv, channels, out_index):
        calls.append((conv, channels, out_index))
        return convolution(conv, channels, out_index)

    with mock.patch.object(compact.CompactConv, "per_sample", spy):
        (out, macs), (masked, masked_macs) = compact_and_masked(model, x, torch.zeros_like(tasks))
    assert torch.allclose(out, masked, atol=1e-5) and torch.equal(macs, masked_macs)
    convolutions = [layer for layer in model._compact_paths[0].backbone.layers if layer.conv.conv is not None]
    assert len(calls) >= len(convolutions)
    with torch.no_grad():
        _, trace = model.forward_path(x, 0)
    opened = [(mask > 0).sum(1).max() for mask in trace.masks]
    for conv, channels, out_index in calls:
        assert out_index.shape[1] < conv.out_channels, "fewer channels than the task keeps"
        assert channels.values.shape[1] == len(x) * channels.index.shape[1]
    first_layer = calls[0][2]
    assert first_layer.shape[1] == opened[0], "as many as the most any sample opens"
    # Grouped by sample on large maps; on maps under PER_SAMPLE_MIN_POSITIONS (ResNet-18's
    # last stages here) every kept channel, each sample's then picked.
    with mock.patch("torch.nn.functional.conv2d", wraps=F.conv2d) as conv2d, torch.no_grad():
        model.forward_with_macs(x, torch.zeros_like(tasks))
    positions = {call.kwargs.get("groups", 1): [] for call in conv2d.call_args_list}
    for call in conv2d.call_args_list:
        positions[call.kwargs.get("groups", 1)].append(call.args[0].shape[2] * call.args[0].shape[3])
    assert min(positions[len(x)]) >= compact.PER_SAMPLE_MIN_POSITIONS
    if backbone == "resnet18":
        assert min(positions[1]) < compact.PER_SAMPLE_MIN_POSITIONS
    one, hat = learned_model("ccgn", backbone, "task"), learned_model("hat", backbone, "task")
    hat.backbone.per_sample_from_batch = len(x)
    with mock.patch.object(compact.CompactConv, "per_sample", side_effect=AssertionError("per sample")):
        with torch.no_grad():
            model.forward_with_macs(x[1:], torch.zeros_like(tasks[1:]))
            one.forward_with_macs(x[:1], tasks[:1])
            hat.forward_with_macs(x, tasks)
    one.backbone.per_sample_from_batch = 1  # as the benchmark times it
    with mock.patch.object(compact.CompactConv, "per_sample", side_effect=AssertionError("per sample")):
        with pytest.raises(AssertionError, match="per sample"), torch.no_grad():
            one.forward_with_macs(x[:1], tasks[:1])


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])
def test_a_grouped_convolution_whose_input_positions_lie_an_aliased_stride_apart_reads_a_zero_channel_more(
        backbone, monkeypatch):
    """Where a grouped convolution's input positions lie a multiple of
    ALIASED_STRIDE_BYTES apart (here every stride), each sample's channels get a zero one
    after them, with zero weights: the same outputs and MACs as the masked layers."""
    model = learned_model("ccgn", backbone, "task")
    x, tasks = inputs()
    model.backbone.per_sample_from_batch = len(x)
    monkeypatch.setattr(compact, "ALIASED_STRIDE_BYTES", 4)
    with mock.patch.object(compact.CompactConv, "per_sample", autospec=True,
                           side_effect=compact.CompactConv.per_sample) as per_sample, \
            mock.patch("torch.nn.functional.conv2d", wraps=F.conv2d) as conv2d:
        (out, macs), (masked, masked_macs) = compact_and_masked(model, x, torch.zeros_like(tasks))
    assert torch.allclose(out, masked, atol=1e-5) and torch.equal(macs, masked_macs)
    counts = [call.args[1].index.shape[1] for call in per_sample.call_args_list]  # (conv, channels, out_index)
    grouped = [call.args[0].shape[1] // len(x) for call in conv2d.call_args_list if call.kwargs.get("groups") == len(x)]
    assert grouped and len(grouped) <= len(counts)
    assert all(n in {count + 1 for count in counts} for n in grouped), "a zero channel more per sample"

    values = torch.randn(3, 2, 4, 5)  # 3 samples of 2 channels
    padded = compact.with_zero_channel(values.reshape(1, 6, 4, 5).to(memory_format=torch.channels_last), 3)
    assert padded.is_contiguous(memory_format=torch.channels_last)
    per_sample = padded.reshape(3, 3, 4, 5)
    assert torch.equal(per_sample[:, :2], values) and not per_sample[:, 2].any()


@pytest.mark.parametrize("setting", ["task", "class"])
def test_each_samples_channels_run_a_large_batch_in_parts(setting, monkeypatch):
    """Compact paths computing each sample's open channels run a batch of more than
    PER_SAMPLE_MAX_BATCH samples (here 5) in parts of that many, with the outputs and MACs
    of the batch run whole; the kept channels, and HAT's paths (whose masks do not differ
    between samples), run it whole."""
    model = learned_model("ccgn", "small_cnn", setting)
    model.backbone.per_sample_from_batch, model.stacked_paths_max_batch = 2, 0
    x, tasks = inputs()[0], torch.zeros(12, dtype=torch.long)
    with torch.no_grad():
        whole, whole_macs = model.forward_with_macs(x, tasks)
    monkeypatch.setattr(path_network, "PER_SAMPLE_MAX_BATCH", 5)
    batches = {True: [], False: []}
    call, per_sample = compact.CompactSmallCNN.__call__, compact.CompactSmallCNN.per_sample

    def spy_call(backbone, images, *arguments, **options):
        batches[False].append(len(images))
        return call(backbone, images, *arguments, **options)

    def spy_per_sample(backbone, images, *arguments):
        batches[True].append(len(images))
        return per_sample(backbone, images, *arguments)

    monkeypatch.setattr(compact.CompactSmallCNN, "__call__", spy_call)
    monkeypatch.setattr(compact.CompactSmallCNN, "per_sample", spy_per_sample)
    with torch.no_grad():
        parted, parted_macs = model.forward_with_macs(x, tasks)
    assert torch.allclose(parted, whole, atol=1e-5) and torch.equal(parted_macs, whole_macs)
    paths = 1 if setting == "task" else model.tasks_learned
    assert batches[True] == [5] * paths + [5] * paths + [2] * paths
    batches[True].clear()
    model.per_sample_channels = False
    with torch.no_grad():
        model.forward_with_macs(x, tasks)
    assert not batches[True] and set(batches[False][-paths:]) == {12}
    hat = learned_model("hat" if setting == "task" else "hat_tc", "small_cnn", setting)
    hat.backbone.per_sample_from_batch, hat.stacked_paths_max_batch = 2, 0
    with torch.no_grad():
        hat.forward_with_macs(x, tasks)
    assert set(batches[False][-paths:]) == {12}


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("setting", ["task", "class"])
@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])
def test_compact_paths_keep_the_channels_last_layout_through_every_convolution(backbone, setting, per_sample):
    """Every convolution of a compact path reads its input with channels innermost (the
    channels-last layout, or a view of the kept channels of a padded output): a
    convolution's output follows its input's layout, and every convolution after an NCHW
    tensor ran in that layout, up to twice as slowly (ResNet-18's identity shortcuts made
    one until session 20; a layer keeping one channel, which fits both layouts, still
    can, and the convolution restrides such a map). Each path on its own and, in the
    class setting, run as one."""
    model = learned_model("ccgn", backbone, setting)
    model.per_sample_channels, model.backbone.per_sample_from_batch = per_sample, 2
    x, tasks = inputs()
    layouts, convolution = [], F.conv2d

    def conv2d(images, *arguments, **options):
        layouts.append(images.stride(1) == 1)
        return convolution(images, *arguments, **options)

    with mock.patch.object(F, "conv2d", conv2d), torch.no_grad():
        for stacked_up_to in (0, len(x)):
            run_as_one(model, stacked_up_to)
            model.forward_with_macs(x, tasks)
    assert layouts and all(layouts)


@pytest.mark.parametrize("backbone, from_batch", [("small_cnn", 16), ("resnet18", None)])
def test_by_default_only_the_small_cnn_computes_each_samples_channels(backbone, from_batch):
    """The small CNN's compact paths compute each sample's open channels from a batch of
    16, ResNet-18's never: its kept channels took less time at every batch up to 64."""
    model, x = learned_model("ccgn", backbone, "task"), inputs(64)[0]
    assert [model.runs_per_sample(x[:n]) for n in (15, 16, 64)] == [bool(from_batch) and n >= from_batch
                                                                    for n in (15, 16, 64)]


def test_the_class_settings_shared_first_layer_follows_the_paths_it_serves():
    """The first layer the class setting's paths share is rebuilt when the learned paths
    change: here one more task learned, no tensor changed."""
    model = learned_model("ccgn", "small_cnn", "class")
    x, tasks = inputs()
    compact_and_masked(model, x, tasks)
    model.tasks_learned = 3
    (out, macs), (masked_out, masked_macs) = compact_and_masked(model, x, tasks)
    assert torch.allclose(out, masked_out, atol=1e-5) and torch.equal(macs, masked_macs)


@pytest.mark.parametrize("strategy", ["ccgn", "hat"])
def test_a_compact_path_is_rebuilt_whenever_what_it_was_cut_from_changes(strategy):
    """Each change (written in place like an optimiser step, a task's mask changed, a
    weight's storage or a buffer replaced rather than written, another model's state
    loaded, a weight replaced by a new parameter, a head by a new module) changes the
    outputs, and the compact paths follow the masked layers; so they do after a move to
    float64."""
    model = learned_model(strategy, "resnet18", "task")
    x, tasks = inputs()
    block = model.backbone.blocks[4]  # a projection shortcut, and gates open for many samples
    other = learned_model(strategy, "resnet18", "task")
    with torch.no_grad():
        other.backbone.stem.layer.weight.mul_(2)
    if strategy == "ccgn":
        change_mask = lambda: block.conv1.freeze(0, block.conv1.allowed[0] & (torch.arange(block.conv1.out_units) % 2 == 0))
    else:
        change_mask = lambda: block.conv1.embedding.weight[0].neg_()
    weight, spare_head = block.conv1.layer.weight, nn.Linear(model.heads[0].in_features, model.heads[0].out_features)
    changes = [lambda: weight.mul_(1.5), change_mask,
               lambda: setattr(weight, "data", weight * 1.5),  # as `.to()` does: same object and version
               lambda: setattr(block.conv2.norm, "running_mean", block.conv2.norm.running_mean + 1),
               lambda: model.load_state_dict(other.state_dict()),
               lambda: setattr(block.conv2.layer, "weight", nn.Parameter(block.conv2.layer.weight * 1.5)),
               lambda: model.heads.__setitem__(0, spare_head)]  # made before the paths were cut
    before, _ = compact_and_masked(model, x, tasks)[0]
    for index, change in enumerate(changes):
        with torch.no_grad():
            change()
        (after, _), (masked, _) = compact_and_masked(model, x, tasks)
        assert not torch.allclose(after, before, atol=1e-3), f"change {index} should change the outputs"
        assert torch.allclose(after, masked, atol=1e-5), f"after change {index}"
        before = after
    with torch.no_grad():
        after, _ = model.double().compact_paths([(0,)])[0](x.double())
        masked, _ = model.forward_path(x.double(), 0)
    assert after.dtype == torch.float64 and torch.allclose(after, masked, atol=1e-5)


def test_a_compact_path_is_rebuilt_when_a_tensor_a_weight_is_computed_from_changes():
    """ltp computes each weight from the raw weight and a learned threshold: attaching it
    to paths already cut, and then a step of the threshold alone, change the weights the
    paths are cut from."""
    from clbench.modules.ltp import attach, thresholds

    model = learned_model("ccgn", "small_cnn", "task")
    x, tasks = inputs()
    before, _ = compact_and_masked(model, x, tasks)[0]
    attach(model, threshold=0.0, temperature=0.05)
    (after, _), (masked, _) = compact_and_masked(model, x, tasks)
    assert not torch.allclose(after, before, atol=1e-3)
    assert torch.allclose(after, masked, atol=1e-5)
    before = after
    with torch.no_grad():
        for _, soft in thresholds(model):
            soft.threshold.add_(0.5)
    (after, _), (masked, _) = compact_and_masked(model, x, tasks)
    assert not torch.allclose(after, before, atol=1e-3)
    assert torch.allclose(after, masked, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ccgn", "hat"])
def test_in_the_class_setting_a_changed_kernel_rebuilds_every_path_and_a_changed_mask_its_own(strategy):
    """A change of the kernels every path is cut from must reach each path, and a change
    of one task's mask that task's path (with ccgn only that one; HAT holds every task's
    embedding in one tensor)."""
    model = learned_model(strategy, "small_cnn", "class")
    model.stacked_paths_max_batch = 0
    x, tasks = inputs()
    compact_and_masked(model, x, tasks)
    paths = dict(model._compact_paths)
    change_task_mask(model.path_layers[0], 1)
    (out, _), (masked, _) = compact_and_masked(model, x, tasks)
    assert torch.allclose(out, masked, atol=1e-5)
    assert model._compact_paths[1] is not paths[1]
    assert (model._compact_paths[0] is paths[0]) == (strategy == "ccgn")
    paths = dict(model._compact_paths)
    with torch.no_grad():
        model.path_layers[1].layer.weight.mul_(1.5)
    (out, _), (masked, _) = compact_and_masked(model, x, tasks)
    assert torch.allclose(out, masked, atol=1e-5)
    assert all(model._compact_paths[task] is not paths[task] for task in (0, 1))


def test_training_and_gradients_use_the_masked_layers():
    """The compact paths hold copies: where gradients may be wanted (training, or any
    forward pass with autograd on) the masked layers run, and nothing is cut."""
    model = learned_model("ccgn", "small_cnn", "class")
    x, tasks = inputs()
    out, _ = model.eval().forward_with_macs(x, tasks)
    assert out.requires_grad
    with torch.no_grad():
        model.train().forward_with_macs(x[:4], tasks[:4])
    assert not model._compact_paths


@pytest.mark.parametrize("strategy", ["ccgn", "hat_tc"])
def test_the_class_settings_training_reads_the_learned_paths_through_their_compact_paths(strategy, tiny_scenario,
                                                                                         monkeypatch):
    """The task classifier, trained during each task and after it (`both`), reads the
    learned paths' features through their compact paths, cut again after every
    optimiser step: without autograd only the compact paths run them, and what they give
    is the masked layers' within float tolerance. The task in training runs its masked
    layers."""
    masked_runs, compact_reads, checking = [], [], []
    masked_path, learned_paths = TaskPathNet.masked_path, TaskPathNet.learned_paths

    def spy_masked(model, x, task, trace=None):
        masked_runs.append((torch.is_grad_enabled(), bool(checking)))
        return masked_path(model, x, task, trace)

    def spy_learned(model, x):
        read = learned_paths(model, x)
        if not model.training and not torch.is_grad_enabled():
            compact_reads.append(model.runs_compact())
            model.compact_inference = False
            checking.append(True)
            masked = learned_paths(model, x)[0]
            checking.clear()
            model.compact_inference = True
            assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(read[0], masked))
        return read

    monkeypatch.setattr(TaskPathNet, "masked_path", spy_masked)
    monkeypatch.setattr(TaskPathNet, "learned_paths", spy_learned)
    hparams = {"classifier_training": "both", "classifier_epochs": 1, **({"lr": 0.01} if strategy == "ccgn" else {})}
    train_tasks(get_strategy(strategy), tiny_scenario, "class", 2, "small_cnn", 8, hparams)
    assert len(compact_reads) > 2 and all(compact_reads)
    assert (True, False) in masked_runs  # the task in training
    assert all(with_grad or in_check for with_grad, in_check in masked_runs)


def test_a_past_tasks_predictions_through_its_compact_path_survive_a_later_task(tiny_scenario):
    """ccgn trained on two tasks: after the second, the first task's compact path is cut
    again from retrained weights and still gives the same outputs."""
    seen = {}

    def check(strategy, scenario, task):
        model = strategy.model.eval()
        x = next(iter(torch.utils.data.DataLoader(scenario.benchmark.test_stream[0].dataset.eval(), batch_size=64)))[0]
        with torch.no_grad():
            out = model(x, torch.zeros(len(x), dtype=torch.long))
        if task == 0:
            seen["out"], seen["path"] = out, model._compact_paths[0]
        else:
            assert model._compact_paths[0] is not seen["path"]
            assert torch.equal(out, seen["out"])

    train_tasks(get_strategy("ccgn"), tiny_scenario, "task", 2, "small_cnn", 8, {"lr": 0.01}, check)


@pytest.mark.parametrize("strategy", ["ccgn", "hat"])
def test_copies_and_checkpoints_leave_the_compact_paths_out(strategy):
    model = learned_model(strategy, "small_cnn", "task")
    x, tasks = inputs()
    with torch.no_grad():
        expected = model(x, tasks)
    assert model._compact_paths
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not copied._compact_paths
        with torch.no_grad():
            assert torch.equal(copied(x, tasks), expected)


def test_gate_usage_counts_the_channels_a_batch_opens_of_those_its_task_keeps():
    """The benchmark's "open of kept" column: its second number is the kept channels, not the layer's width."""
    model = learned_model("ccgn", "small_cnn", "task")
    _, channels = load_script("benchmarks", "gated_inference").gate_usage(model, inputs()[0])
    counts = [[int(n) for n in layer.split(" of ")] for layer in channels.split("/")]
    kept = [layer.kept_channels(0) for layer in model.path_layers]
    assert [k for _, k in counts] == [int(k.sum()) for k in kept]
    assert all(int(k.sum()) < k.numel() for k in kept)
    assert all(0 < used <= k for used, k in counts)


def test_gated_inference_keeps_the_fastest_and_the_widest_narrowed_dense_backbone():
    keep = load_script("benchmarks", "gated_inference").fastest_and_widest_narrow
    times = {"dense": [3.0], "dense_width_1": [2.0, 1.5], "dense_width_10": [1.3], "dense_width_2": [1.0, 4.0],
             "dense_width_3": [1.2]}
    assert keep(times) == {"dense": [3.0], "dense_width_10": [1.3], "dense_width_2": [1.0, 4.0]}
    assert keep({"dense": [3.0], "dense_width_1": [1.0]}) == {"dense": [3.0], "dense_width_1": [1.0]}
    assert keep({"dense": [3.0]}) == {"dense": [3.0]}


def test_gated_inference_benchmark_writes_its_table(tiny_scenario, tmp_path, capsys):
    benchmark = load_script("benchmarks", "gated_inference")
    output = tmp_path / "gated_inference.csv"
    benchmark.main(["--tiny", "--threads", "1", "--output", str(output), "--trained-on", tiny_scenario,
                    "--resnet-width", "3", "--allowed", "1"])
    table = pd.read_csv(output)
    assert list(table.columns) == benchmark.COLUMNS
    assert table.groupby("backbone").width.agg(set).to_dict() == {"resnet18": {3}, "small_cnn": {4}}
    assert (table.query("gates == 'random'").allowed == 1).all()
    assert table.query("gates == 'trained'").allowed.isna().all()
    # Every kernel allowed: a task keeps every channel, as many MACs as the dense ResNet-18.
    assert (table.query("backbone == 'resnet18' and setting == 'task'").speedup_kept_macs == 1).all()
    executions = {"dense", "masked", "compact", "compact_unpadded", "per_sample"}
    assert set(table.query("setting == 'task'").execution) - executions <= {f"dense_width_{n}" for n in range(1, 4)}
    assert executions < set(table.query("setting == 'task'").execution)
    # The random-gate small CNN's task path runs more MACs than its width 1 on one image,
    # and so does the ResNet-18 whose tasks keep every kernel: two narrowed dense
    # backbones per network and batch at most, of no more MACs than the gated
    # executions, on both backbones; none in the class setting.
    narrowed = table[table.execution.str.startswith("dense_width_")]
    assert narrowed.groupby(["backbone", "gates", "batch"]).size().max() <= 2
    assert set(narrowed.backbone) == {"small_cnn", "resnet18"} and set(narrowed.setting) == {"task"}
    assert 1 in set(narrowed.query("gates == 'random'").batch)
    gated = table.query("execution == 'per_sample'").set_index(["backbone", "gates", "setting", "batch"])
    assert all(row.macs_per_sample <= gated.macs_per_sample[row.backbone, row.gates, "task", row.batch]
               for row in narrowed.itertuples())
    assert set(table.query("setting == 'class'").execution) == executions | {"stacked", "dense_every_path"}
    assert set(table.setting) == {"task", "class"} and set(table.backbone) == {"small_cnn", "resnet18"}
    assert set(table.query("backbone == 'small_cnn'").gates) == {"trained", "random"}
    # A trained task's path runs fewer MACs than the dense network.
    trained = table.query("gates == 'trained' and setting == 'task' and execution == 'compact'")
    assert (trained.speedup_macs > 1).all()
    # Random gates open about half of what a task keeps: every kept channel open costs more.
    compact = table.query("gates == 'random' and execution == 'compact'")
    assert (compact.kept_macs_per_sample > compact.macs_per_sample).all()
    patterns = table.query("execution == 'compact'").set_index("batch").gate_patterns.str.split("/")
    assert all(set(layers) == {"1"} for layers in patterns.loc[1]), "one image has one gate pattern per layer"
    assert any(int(n) > 1 for layers in patterns.loc[64] for n in layers)
    # Channels some sample opens, of those kept: never more; a batch opens at least what its
    # first image does; one image through random gates leaves some kept channel closed.
    columns = ["backbone", "gates", "setting", "batch", "batch_open_channels"]
    opened = {tuple(row[:4]): [[int(n) for n in layer.split(" of ")] for layer in row[4].split("/")]
              for row in table.query("execution == 'compact'")[columns].itertuples(index=False)}
    assert all(used <= kept for layers in opened.values() for used, kept in layers)
    assert all(used >= first for (*network, batch), layers in opened.items() if batch == 64
               for (used, _), (first, _) in zip(layers, opened[(*network, 1)]))
    assert any(used < kept for (_, gates, _, batch), layers in opened.items() if gates == "random" and batch == 1
               for used, kept in layers)
    assert set(table.batch) == {1, 64}
    assert (table.best_ms > 0).all() and (table.best_ms <= table.median_ms).all()
    assert "speed-up" in capsys.readouterr().out


def test_gated_inference_benchmark_profiles_one_execution_without_a_table(tiny_scenario, tmp_path, capsys):
    """`--profile stacked`: the class setting's networks only (the task setting has no
    stacked paths), each batch, the stacked paths' operators (their heads' batched
    product among them), and no CSV."""
    benchmark = load_script("benchmarks", "gated_inference")
    output = tmp_path / "gated_inference.csv"
    benchmark.main(["--tiny", "--threads", "1", "--output", str(output), "--trained-on", tiny_scenario,
                    "--profile", "stacked"])
    printed = capsys.readouterr().out
    headers = [line for line in printed.splitlines() if line.endswith(", stacked:")]
    assert len(headers) == 6 and all("class setting" in line for line in headers)
    assert "aten::baddbmm" in printed and "Input Shapes" in printed
    assert not output.exists()


def test_the_agreement_script_finds_where_compact_and_masked_predictions_differ(tiny_scenario, tmp_path, capsys,
                                                                               monkeypatch):
    """A tiny ccgn run's compact and masked predictions agree; with the compact
    convolutions' outputs negated (those computing one set of channels per batch, then
    those computing each sample's), or in the class setting the stacked paths' logits,
    the script reports the predictions that change, in that execution's column only."""
    agreement = load_script("scripts", "compact_agreement")
    run_dir = run(RunConfig(scenario=tiny_scenario, strategy="ccgn", setting="task", width=8,
                            results_dir=str(tmp_path), keep_checkpoints=True)).run_dir

    def rows() -> list[list[str]]:
        capsys.readouterr()
        agreement.main([str(run_dir)])
        lines = [line for line in capsys.readouterr().out.splitlines() if line[:3] in [f"| {k}" for k in "12345"]]
        return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]

    honest = rows()
    assert len(honest) == 5 and all(row[2] == row[3] == row[4] and row[5] == row[8] == "0" for row in honest)
    with monkeypatch.context() as patched:
        conv = compact.CompactConv.__call__
        patched.setattr(compact.CompactConv, "__call__", lambda self, x: -conv(self, x))
        broken = rows()
        assert sum(int(row[8]) for row in broken) > 0
    per_sample = compact.CompactConv.per_sample
    with monkeypatch.context() as patched:
        patched.setattr(compact.CompactConv, "per_sample", lambda self, x, index: -per_sample(self, x, index))
        broken = rows()
        assert sum(int(row[5]) for row in broken) > 0 and all(row[8] == "0" for row in broken)
    # The class setting adds the stacked paths: accuracy and differences in columns 5 and 12-14.
    run_dir = run(RunConfig(scenario=tiny_scenario, strategy="ccgn", setting="class", width=8,
                            results_dir=str(tmp_path), keep_checkpoints=True)).run_dir
    honest = rows()
    assert all(row[2] == row[4] == row[5] and row[12] == "0" for row in honest)
    stacked = compact.CompactPath.stacked

    def negated_logits(path, x, stages):
        read, logits, macs = stacked(path, x, stages)
        return read, [-chunk for chunk in logits], macs

    monkeypatch.setattr(compact.CompactPath, "stacked", negated_logits)
    broken = rows()
    assert sum(int(row[12]) for row in broken) > 0 and all(row[6] == row[9] == "0" for row in broken)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile needs a C++ compiler on CPU")
def test_compiled_compact_paths_compute_what_the_eager_ones_do(monkeypatch):
    """`compile_compact` only fuses operations: the same outputs within float tolerance
    and the same MACs, through a path torch.compile built, which never computes each
    sample's channels, and which the graphs it compiled do not put out of date (compiled
    afresh, as the first time on a machine)."""
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)
    x, _ = inputs()
    tasks = torch.zeros(len(x), dtype=torch.long)  # one path: one compilation
    eager, fused = learned_model("ccgn", "small_cnn", "task"), learned_model("ccgn", "small_cnn", "task")
    fused.compile_compact = True
    with torch.no_grad():
        (out, macs), (fused_out, fused_macs) = eager.forward_with_macs(x, tasks), fused.forward_with_macs(x, tasks)
    assert torch.allclose(out, fused_out, atol=1e-5) and torch.equal(macs, fused_macs)
    assert fused._compact_paths[0].run_backbone is not fused._compact_paths[0].backbone
    assert eager._compact_paths[0].run_backbone is eager._compact_paths[0].backbone
    compiled = fused._compact_paths[0]
    with torch.no_grad():
        fused.forward_with_macs(x, tasks)
    assert fused._compact_paths[0] is compiled
    larger = torch.cat([x] * 2)  # each sample's channels would change the compiled shapes
    assert eager.runs_per_sample(larger) and not fused.runs_per_sample(larger)


@pytest.mark.parametrize("gates", ["random", "trained"])
def test_compiled_paths_benchmark_writes_its_table(gates, tiny_scenario, tmp_path, monkeypatch, capsys):
    """The benchmark's rows and checks, with torch.compile left out (it takes minutes;
    the test above compiles)."""
    monkeypatch.setattr(torch, "compile", lambda function, **options: function)
    benchmark = load_script("benchmarks", "compiled_paths")
    output = tmp_path / "compiled_paths.csv"
    benchmark.main(["--tiny", "--threads", "1", "--output", str(output)]
                   + (["--trained-on", tiny_scenario] if gates == "trained" else []))
    table = pd.read_csv(output)
    assert list(table.columns) == benchmark.COLUMNS
    assert set(table.execution) == {"dense", "dense_compiled", "compact", "compact_compiled"}
    assert len(table) == 2 * 2 * 4 and (table.best_ms <= table.median_ms).all() and set(table.gates) == {gates}
    assert "speed-up over dense" in capsys.readouterr().out

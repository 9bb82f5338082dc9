"""The per-task-path network shared by ccgn and HAT: the same function as the dense
backbones with every mask open, and per-sample accounting in batches that mix tasks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clbench.compact import Registrations
from clbench.models import BACKBONES, ModelSpec, channels_last
from clbench.path_network import PATH_BACKBONES, FreezableBatchNorm2d, PathLayer, PathTrace, positions_mean
from clbench.registry import get_strategy


class OpenLayer(PathLayer):
    """Every channel open: the masked layer reduced to the plain one."""

    def mask(self, x, task, trace):
        return torch.ones(len(x), self.out_units)


class FractionalMaskLayer(PathLayer):
    """Masks in (0, 1) that differ by sample and channel, a third or so exactly 0 but with
    the gradient of what they replace, as ccgn's closed straight-through gates have."""

    def __init__(self, layer, norm, tied=None):
        super().__init__(layer, norm, tied)
        self.logits = nn.Parameter(torch.randn(6, self.out_units))

    def mask(self, x, task, trace):
        soft = torch.sigmoid(self.logits[:len(x)])
        return soft - (soft * (soft < 0.4)).detach()


def weighted_layers(network: nn.Module) -> list[nn.Module]:
    return [m for m in network.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]


@pytest.mark.parametrize("backbone,in_channels,size", [("small_cnn", 1, 28), ("resnet18", 3, 32)])
def test_path_backbone_with_every_mask_open_is_the_dense_backbone(backbone, in_channels, size):
    torch.manual_seed(0)
    dense = BACKBONES[backbone](in_channels, 4, size).eval()
    path = PATH_BACKBONES[backbone](in_channels, 4, size, OpenLayer).eval()
    pairs = list(zip(weighted_layers(dense), weighted_layers(path), strict=True))
    for plain, masked in pairs:
        assert isinstance(masked, type(plain))
        if isinstance(plain, nn.BatchNorm2d):  # statistics and affine parameters that matter
            for tensor in (plain.weight.data, plain.bias.data, plain.running_mean):
                tensor.uniform_(-1, 1)
            plain.running_var.uniform_(0.5, 2)
        missing, unexpected = masked.load_state_dict(plain.state_dict(), strict=False)
        assert missing in ([], ["frozen"]) and not unexpected
    x = torch.randn(6, in_channels, size, size)
    with torch.no_grad():
        expected = dense(x)
        assert torch.allclose(path(x, 0, PathTrace()), expected, atol=1e-5)
        # The comparison is sharp: one changed weight changes the output.
        pairs[-1][1].weight[0].add_(0.1)
        assert not torch.allclose(path(x, 0, PathTrace()), expected, atol=1e-5)


def test_positions_mean_is_mean_to_the_bit_gradient_included():
    """ccgn's gates read their input through `positions_mean`, whose backward is cheaper
    than `mean`'s: the gates, and so every result, must not move by a bit."""
    torch.manual_seed(0)
    x = channels_last(torch.randn(5, 7, 6, 6)).requires_grad_()  # 36 positions: dividing rounds
    upstream = torch.randn(5, 7)
    got, expected = positions_mean(x), x.mean((2, 3))
    assert torch.equal(got, expected)
    assert torch.equal(*(torch.autograd.grad(out, x, upstream)[0] for out in (got, expected)))
    flat = torch.randn(5, 7)
    assert positions_mean(flat) is flat


@pytest.mark.parametrize("closed_gates_learn", [False, True])
def test_small_cnn_masking_after_relu_and_pooling_is_masking_before(closed_gates_learn, monkeypatch):
    """The small CNN multiplies each conv's mask after its ReLU and max-pooling (cheaper):
    outputs and gradients are those of the layer-by-layer definition, mask first; with
    `closed_gates_learn`, the gradients of the mask multiplying the pooled output."""
    monkeypatch.setattr(FractionalMaskLayer, "closed_gates_learn", closed_gates_learn)
    torch.manual_seed(0)
    network = PATH_BACKBONES["small_cnn"](1, 4, 28, FractionalMaskLayer)
    x = torch.randn(6, 1, 28, 28)

    def masked(layer, h, then):
        out = layer.layer(h)
        mask = layer.mask(h, 0, None).view(*out.shape[:2], *[1] * (out.dim() - 2))
        return then(out) * mask if closed_gates_learn else then(out * mask)

    h = x
    for conv in network.layers[:2]:
        h = masked(conv, h, lambda out: F.max_pool2d(F.relu(out), 2))
    definition = masked(network.layers[2], h.flatten(1), F.relu)
    output = network(x, 0, PathTrace())
    assert torch.allclose(output, definition, atol=1e-6)
    weights = torch.randn_like(output)
    parameters = list(network.parameters())
    for got, expected in zip(torch.autograd.grad((output * weights).sum(), parameters),
                             torch.autograd.grad((definition * weights).sum(), parameters), strict=True):
        assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ccgn", "hat"])
@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])
def test_a_batch_that_mixes_tasks_is_accounted_per_sample(strategy, backbone):
    """Outputs and executed MACs of each sample of a mixed-task batch equal running that
    sample alone through its task's path (untrained gates and attention differ from task
    to task, and ccgn's gates from sample to sample)."""
    torch.manual_seed(0)
    spec = ModelSpec(backbone, 4, (1, 28, 28), "task", [[0, 1], [2, 3], [4, 5]])
    model = get_strategy(strategy).from_hparams({}).make_model(spec).eval()
    x = torch.randn(12, 1, 28, 28) + torch.linspace(-2, 2, 12).view(-1, 1, 1, 1)  # inputs ccgn's gates tell apart
    tasks = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0, 0, 1, 2])
    with torch.no_grad():
        out, macs = model.forward_with_macs(x, tasks)
        assert torch.equal(model(x, tasks), out)
        for i, task in enumerate(tasks.tolist()):
            alone, trace = model.forward_path(x[i:i + 1], task)
            assert torch.allclose(out[i], alone[0], atol=1e-6)
            assert macs[i].item() == trace.macs.item()
    assert len(set(macs.tolist())) > 1, "the tasks' paths should differ for this test to mean anything"
    if strategy == "ccgn":
        assert all(len(set(macs[tasks == task].tolist())) > 1 for task in range(3)), \
            "ccgn's gates should differ between samples of a task for this test to mean anything"


def test_freezable_batch_norm_keeps_frozen_channels_as_in_evaluation_and_trains_the_others():
    """In training, frozen channels are normalised with the stored statistics, which stay
    as they were, and the others with the batch's, whose running statistics update: the
    outputs, input and parameter gradients and statistics of a batch norm in evaluation
    mode on the frozen channels and one in training mode on the others (exactly so on
    the others)."""
    torch.manual_seed(0)
    norm = FreezableBatchNorm2d(6).train()
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    norm.frozen[[1, 4]] = True
    x = (3 * torch.randn(8, 6, 5, 5) + 1).requires_grad_()
    evaluated, trained = nn.BatchNorm2d(6).eval(), nn.BatchNorm2d(6).train()
    for reference in (evaluated, trained):
        reference.load_state_dict({k: v for k, v in norm.state_dict().items() if k != "frozen"})
    before = norm.running_mean.clone(), norm.running_var.clone()
    gradient = torch.randn(8, 6, 5, 5)
    out = norm(x)
    grads = torch.autograd.grad(out, (x, norm.weight, norm.bias), gradient)
    kept, frozen = ~norm.frozen, norm.frozen
    for reference, channels, exact in ((trained, kept, True), (evaluated, frozen, False)):
        expected = reference(x)
        expected_grads = torch.autograd.grad(expected, (x, reference.weight, reference.bias), gradient)
        same = torch.equal if exact else lambda a, b: torch.allclose(a, b, atol=1e-5)
        assert same(out[:, channels], expected[:, channels])
        assert same(grads[0][:, channels], expected_grads[0][:, channels])
        assert all(same(g[channels], e[channels]) for g, e in zip(grads[1:], expected_grads[1:]))
    assert torch.equal(norm.running_mean[frozen], before[0][frozen])
    assert torch.equal(norm.running_var[frozen], before[1][frozen])
    assert torch.equal(norm.running_mean[kept], trained.running_mean[kept])
    assert torch.equal(norm.running_var[kept], trained.running_var[kept])
    assert not torch.allclose(norm.running_mean[kept], before[0][kept])


def twin_batch_norms(frozen: list[int]) -> list[FreezableBatchNorm2d]:
    """Two batch norms in training mode with the same parameters and statistics (not the
    initial ones), channels `frozen` frozen."""
    norms = [FreezableBatchNorm2d(6).train() for _ in range(2)]
    with torch.no_grad():
        norms[0].running_var.uniform_(0.5, 2.0)
        norms[0].weight.uniform_(0.5, 1.5)
        norms[0].bias.normal_()
    norms[0].frozen[frozen] = True
    norms[1].load_state_dict(norms[0].state_dict())
    return norms


def output_and_gradients(norm: FreezableBatchNorm2d, x: torch.Tensor, gradient: torch.Tensor, forward=None):
    """`norm`'s output on `x` (through `forward`, by default `norm` itself) and the
    gradients of input, weight and bias for the output gradient `gradient`."""
    out = (forward or norm)(x)
    return out, *torch.autograd.grad(out, (x, norm.weight, norm.bias), gradient)


@pytest.mark.parametrize("frozen", [[], [1, 4]], ids=["none_frozen", "some_frozen"])
@pytest.mark.parametrize("learn", [True, False], ids=["learning", "not_learning"])
def test_freezable_batch_norm_compiles_to_one_graph_that_matches_eager(frozen, learn):
    """Under torch.compile (AOT autograd, which checks in-place updates against what the
    backward pass saved) a training step of the batch norm is one graph, compiled once,
    with eager's outputs, gradients and statistics: where none is frozen, those of the
    plain batch norm eager runs. The statistics are updated in place: a buffer assigned
    anew counts as a registration (`Registrations`, which compact paths watch), on which
    the compiled graph would be recompiled at every step."""
    torch.manual_seed(0)
    norms = twin_batch_norms(frozen)
    for norm in norms:
        norm.frozen_channels_learn = learn
    x, gradient = torch.randn(8, 6, 5, 5, requires_grad=True), torch.randn(8, 6, 5, 5)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: norms[1](x), backend="aot_eager", fullgraph=True)
    registrations = Registrations.count
    with torch._dynamo.config.patch(error_on_recompile=True):
        results = [(output_and_gradients(norms[0], x, gradient), output_and_gradients(norms[1], x, gradient, compiled))
                   for _ in range(2)]
    assert Registrations.count == registrations
    for eager, traced in results:
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(eager, traced))
    assert all(torch.equal(a, b) for a, b in zip(norms[0].state_dict().values(), norms[1].state_dict().values()))


def test_frozen_channels_that_do_not_learn_change_no_other_gradient():
    """With `frozen_channels_learn` off (ccgn's batch norms), the frozen channels' weight
    and bias get a zero gradient and everything else is as with it on, to the bit."""
    torch.manual_seed(0)
    norms = twin_batch_norms([1, 4])
    norms[1].frozen_channels_learn = False
    x = torch.randn(8, 6, 5, 5, requires_grad=True)
    gradient = torch.randn(8, 6, 5, 5)
    (out, *grads), (out_off, *grads_off) = (output_and_gradients(norm, x, gradient) for norm in norms)
    frozen = norms[0].frozen
    assert torch.equal(out_off, out) and torch.equal(grads_off[0], grads[0])
    for parameter, parameter_off in zip(grads[1:], grads_off[1:]):
        assert torch.equal(parameter_off[~frozen], parameter[~frozen])
        assert not parameter_off[frozen].any() and parameter[frozen].all()
    assert torch.equal(norms[1].running_mean, norms[0].running_mean)
    assert all(not norm.frozen_channels_learn for layer in get_strategy("ccgn").from_hparams({}).make_model(
        ModelSpec("resnet18", 4, (3, 8, 8), "task", [[0, 1]])).path_layers
        for norm in layer.kernel_modules() if isinstance(norm, FreezableBatchNorm2d))

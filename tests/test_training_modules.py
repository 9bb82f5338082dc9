"""Modules that change training: gradient-L1 regularisation (its penalty, its second-order
gradient, its place in Avalanche's loop, ccgn's stability with it, with ptq after it) and
relaxed quantisation (the relaxed weights against rounding, the deployed grid, gradients
to the grid, training the grid, a run)."""

import copy
import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from clbench.datasets.scenarios import build_scenario
from clbench.modules import grad_l1, relaxed_quant
from clbench.modules.ptq import quantised_layers
from test_modules import matrix
from torch import nn
from torch.nn.utils import parametrize

from clbench.cli import main
from clbench.config import RunConfig
from clbench.models import ModelSpec, build_model
from clbench.runner import run


def train_first_task(scenario_name: str, plugins: list[SupervisedPlugin]) -> tuple[Naive, int]:
    """Naive (SGD, lr 0.01) with `plugins` on the first task of `scenario_name`, one epoch
    in batches of 32, small CNN of width 4, multi-head; and how many batches it trained."""
    torch.manual_seed(0)
    scenario = build_scenario(scenario_name, "task", None, 0, False)
    model = build_model(ModelSpec("small_cnn", 4, (1, 28, 28), "task", scenario.task_classes))
    trainer = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                    criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=1, device="cpu",
                    evaluator=partial(EvaluationPlugin, loggers=[]), plugins=plugins)
    experience = scenario.benchmark.train_stream[0]
    trainer.train(experience)
    return trainer, math.ceil(len(experience.dataset) / 32)


# Gradient-L1 regularisation


def tiny_network() -> nn.Sequential:
    """Smooth (tanh), in double precision: finite differences are exact to ~1e-9."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def penalised_loss(plugin: grad_l1.GradientL1Penalty, model: nn.Module, x, y) -> torch.Tensor:
    """The loss the plugin leaves for the backward pass, its hooks called as Avalanche does."""
    strategy = SimpleNamespace(model=model)
    plugin.before_forward(strategy)
    output = model(x)
    plugin.after_forward(strategy)
    strategy.loss = F.cross_entropy(output, y)
    plugin.before_backward(strategy)
    return strategy.loss


def test_grad_l1_penalty_is_the_l1_norm_of_the_loss_gradient_in_weights_and_layer_inputs():
    model = tiny_network()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    hidden = model[1](model[0](x))  # the second layer's input; the first's is the data
    loss = F.cross_entropy(model[2](hidden), y)
    weight_grads = torch.autograd.grad(loss, [model[0].weight, model[2].weight], retain_graph=True)
    (hidden_grad,) = torch.autograd.grad(loss, hidden)
    expected = loss + 0.3 * sum(g.abs().sum() for g in weight_grads) + 0.7 * hidden_grad.abs().sum()
    torch.testing.assert_close(penalised_loss(grad_l1.GradientL1Penalty(0.3, 0.7), model, x, y), expected)


def test_grad_l1_penalty_gradient_matches_finite_differences():
    """The gradient the penalised loss backpropagates to the weights (second order: the
    penalty is a norm of a gradient) equals central differences of the penalised loss,
    weight by weight, and differs from the plain loss's gradient."""
    model = tiny_network()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    plugin = grad_l1.GradientL1Penalty(1.0, 1.0)
    weights = [model[0].weight, model[2].weight]
    analytic = torch.autograd.grad(penalised_loss(plugin, model, x, y), weights)
    plain = torch.autograd.grad(F.cross_entropy(model(x), y), weights)
    step = 1e-6
    for weight, gradient, plain_gradient in zip(weights, analytic, plain):
        numeric = torch.zeros_like(weight)
        for i in range(weight.numel()):
            values = []
            for shift in (step, -2 * step):
                with torch.no_grad():
                    weight.view(-1)[i] += shift
                values.append(penalised_loss(plugin, model, x, y).item())
            with torch.no_grad():
                weight.view(-1)[i] += step
            numeric.view(-1)[i] = (values[0] - values[1]) / (2 * step)
        torch.testing.assert_close(gradient, numeric, rtol=1e-5, atol=1e-7)
        assert (gradient - plain_gradient).abs().max() > 1e-2


class CheckGradientL1Loss(SupervisedPlugin):
    """Placed after grad_l1's plugin (weight 1, activation weight 1): the loss Avalanche is
    about to backpropagate is the criterion, plus exactly the weights' gradient-L1 norm,
    plus a positive activation term."""

    def __init__(self):
        super().__init__()
        self.checked = 0

    def before_backward(self, strategy, **kwargs):
        criterion = strategy._criterion(strategy.mb_output, strategy.mb_y)
        weights = [layer.weight for layer in quantised_layers(strategy.model)]
        grads = torch.autograd.grad(criterion, weights, retain_graph=True, allow_unused=True)
        weight_term = sum(g.abs().sum() for g in grads if g is not None)
        activation_term = strategy.loss - criterion - weight_term
        assert weight_term > 0 and activation_term > 1e-4 * weight_term
        assert strategy.loss.requires_grad
        self.checked += 1


def test_grad_l1_adds_its_penalty_in_avalanches_training_loop(tiny_scenario):
    check = CheckGradientL1Loss()
    _, batches = train_first_task(tiny_scenario, [grad_l1.GradientL1Penalty(1.0, 1.0), check])
    assert check.checked == batches


def learning_run(scenario_name: str, tmp_path, **options) -> Path:
    """Two tasks of the tiny scenario, long enough to learn each (width 8, 3 epochs)."""
    return run(RunConfig(scenario=scenario_name, results_dir=str(tmp_path), classes_per_task=5, width=8, epochs=3,
                         **options)).run_dir


def test_grad_l1_with_ptq_on_naive(tiny_scenario, tmp_path):
    """Both modules in one run, with their defaults: the regularised network learns, and
    ptq reports its variant."""
    run_dir = learning_run(tiny_scenario, tmp_path, modules=[
        "grad_l1", {"name": "ptq", "bits": [4], "granularity": ["per_channel"]}])
    assert matrix(run_dir).loc[1, "task_1"] > 0.7
    assert matrix(run_dir, "accuracy_matrix@w4a4_per_channel.csv").loc[1, "task_1"] > 0.7
    table = pd.read_csv(run_dir / "metrics.csv").query("task.isna()").set_index(["metric", "step"]).value
    assert table["nonfinite_loss_iterations", 2] == 0


def test_grad_l1_keeps_ccgns_past_tasks_exactly(tiny_scenario, tmp_path):
    """The penalty's gradient goes through ccgn's masks of frozen kernels: task 1's accuracy
    after task 2 is the same as after task 1 (learnt: chance is 0.2)."""
    run_dir = learning_run(tiny_scenario, tmp_path, strategy="ccgn", hparams={"lr": 0.01}, modules=["grad_l1"])
    accuracy = matrix(run_dir)
    assert accuracy.loc[2, "task_1"] == accuracy.loc[1, "task_1"] > 0.5


# Relaxed quantisation


def grid_for(weight: torch.Tensor, bits: int, offset: float) -> relaxed_quant.LayerGrid:
    grid = relaxed_quant.LayerGrid(weight, bits)
    with torch.no_grad():
        grid.offset.fill_(offset)
    return grid


def test_relaxed_weights_become_rounding_to_the_grid_as_temperature_and_noise_go_to_zero():
    torch.manual_seed(0)
    weight = torch.randn(64, 32)
    grid = grid_for(weight, 3, offset=0.3)
    weight = weight * 1.5  # some beyond the grid: rounded to its end points
    grid.temperature = 1e-6
    position = weight / grid.log_alpha.exp() - grid.offset
    # On a cell boundary rounding is either way; leave out weights within 1% of a step of one.
    away = (position - position.floor() - 0.5).abs() > 0.01
    with torch.no_grad():
        grid.log_sigma.fill_(math.log(1e-4))
        relaxed, rounded = grid(weight), grid.hard(weight)
    assert away.float().mean() > 0.9
    torch.testing.assert_close(relaxed[away], rounded[away], rtol=0, atol=1e-6)
    assert len(rounded.unique()) == 2 ** 3
    # With the noise it starts with, a sample at temperature near 0 is still a grid point.
    with torch.no_grad():
        grid.log_sigma.fill_(math.log(relaxed_quant.INITIAL_SIGMA))
        steps = grid(weight) / grid.log_alpha.exp() - grid.offset
    assert (steps - steps.round()).abs().max() < 1e-3
    assert steps.round().min() >= -4 and steps.round().max() <= 3


def test_gradients_reach_the_weights_and_the_grid():
    torch.manual_seed(0)
    weight = torch.randn(16, 8, requires_grad=True)
    grid = grid_for(weight, 4, offset=0.1)
    (grid(weight) * torch.randn(16, 8)).sum().backward()
    for tensor in (weight, grid.log_alpha, grid.offset, grid.log_sigma):
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_deployed_weights_take_at_most_2_to_the_bits_values_and_the_model_is_untouched(bits):
    torch.manual_seed(0)
    model = build_model(ModelSpec("small_cnn", 8, (1, 28, 28), "task", [[0, 1], [2, 3]]))
    before = copy.deepcopy(model.state_dict())
    module = relaxed_quant.RelaxedQuantisation.from_options({"bits": bits})
    (name, variant), = module.variants(model, None, 2).items()
    assert name == f"rq_w{bits}"
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert not any(hasattr(layer, relaxed_quant.GRID) for layer in quantised_layers(model))
    layers = quantised_layers(variant.model)
    assert all(len(layer.weight.unique()) <= 2 ** bits for layer in layers)
    # The grid is used: the largest layer has more than half as many values.
    assert len(max(layers, key=lambda layer: layer.weight.numel()).weight.unique()) > 2 ** (bits - 1)
    assert variant.measures["model_size_bits"] < 32 * sum(p.numel() for p in variant.model.parameters())


class CheckRelaxedForward(SupervisedPlugin):
    """Placed after relaxed_quant's plugin: records the grids' initial scales, the parameters'
    names and each training forward pass's temperature, and checks that the weights are
    relaxed during each layer's pass only."""

    def __init__(self):
        super().__init__()
        self.initial_scales, self.temperatures, self.relaxed_passes = [], [], 0

    def before_training(self, strategy, **kwargs):
        layers = quantised_layers(strategy.model)
        self.initial_scales = [getattr(layer, relaxed_quant.GRID).log_alpha.item() for layer in layers]
        self.parameter_names = [name for name, _ in strategy.model.named_parameters()]
        for layer in layers:
            layer.register_forward_pre_hook(self.count_relaxed_pass)

    def count_relaxed_pass(self, layer, args):
        assert parametrize.is_parametrized(layer, "weight") and layer.training
        self.relaxed_passes += 1

    def before_forward(self, strategy, **kwargs):
        self.temperatures.append(getattr(quantised_layers(strategy.model)[0], relaxed_quant.GRID).temperature)

    def before_backward(self, strategy, **kwargs):
        assert not any(parametrize.is_parametrized(layer) for layer in quantised_layers(strategy.model))


def test_relaxed_quant_trains_the_grids_with_the_strategys_optimiser(tiny_scenario):
    check = CheckRelaxedForward()
    plugin = relaxed_quant.RelaxedWeights(bits=4, temperature=1.0, final_temperature=0.1)
    trainer, batches = train_first_task(tiny_scenario, [plugin, check])
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    # The first task trains the features and its own head; the other heads keep their grids.
    trained = [*quantised_layers(trainer.model.features), trainer.model.heads[0]]
    for layer, initial_scale in zip(quantised_layers(trainer.model), check.initial_scales, strict=True):
        grid = getattr(layer, relaxed_quant.GRID)
        assert {id(p) for p in grid.parameters()} <= optimised
        assert (abs(grid.log_alpha.item() - initial_scale) > 1e-6) == (layer in trained)
    n = len(check.temperatures)
    assert n == batches and check.temperatures[0] == 1.0
    assert check.relaxed_passes == n * len(quantised_layers(trainer.model.features)) + n  # and one head
    # The parameters' order, by which online EWC matches one task's importances to the next's.
    assert [name for name, _ in trainer.model.named_parameters()] == check.parameter_names
    assert check.temperatures[-1] == pytest.approx(0.1 ** ((n - 1) / n))
    assert all(a > b for a, b in zip(check.temperatures, check.temperatures[1:]))


def test_relaxed_quant_runs_on_naive_from_the_command_line(tiny_scenario, tmp_path):
    """Two tasks as in `learning_run`: the deployed network learns each task."""
    assert main(["run", "--scenario", tiny_scenario, "--classes-per-task", "5", "--width", "8", "--epochs", "3",
                 "--results-dir", str(tmp_path), "--module", "relaxed_quant:bits=4"]) == 0
    run_dir = tmp_path / tiny_scenario / "task" / "naive" / "seed0"
    deployed = matrix(run_dir, "accuracy_matrix@rq_w4.csv")
    assert deployed.loc[1, "task_1"] > 0.7 and deployed.loc[2, "task_2"] > 0.7
    table = pd.read_csv(run_dir / "metrics.csv").query("task.isna()").set_index(["metric", "step"]).value
    assert table["model_size_bits@rq_w4", 2] < 8 * table["model_size_bytes", 2] / 4
    assert table["nonfinite_loss_iterations", 2] == 0


def test_ewc_with_relaxed_quant_weighs_the_deployed_networks_importances(tiny_scenario, tmp_path, capsys):
    """On a two-task EWC run with relaxed_quant, EWC's own importances of the last task (mode
    separate keeps them apart) are those `scripts/rq_fisher.py` computes on the hard forward,
    which are the deployed network's, and not the latent weights'."""
    from conftest import load_script

    from clbench import checkpoint
    from clbench.runner import run_scenario

    script = load_script("scripts", "rq_fisher")
    cfg = RunConfig(scenario=tiny_scenario, strategy="ewc", hparams={"mode": "separate"}, width=4,
                    classes_per_task=5, modules=[{"name": "relaxed_quant"}], results_dir=str(tmp_path),
                    keep_checkpoints=True)
    run_dir = run(cfg).run_dir
    scenario = run_scenario(cfg)
    trainer = checkpoint.load(run_dir, scenario)["trainer"]
    dataset = scenario.benchmark.train_stream[1].dataset
    latent, _ = script.weight_importances(trainer, dataset, "latent", cfg.batch_size)
    hard, _ = script.weight_importances(trainer, dataset, "hard", cfg.batch_size)
    ewc = next(p for p in trainer.plugins if hasattr(p, "importances")).importances[1]
    assert latent.keys() == hard.keys() and len(hard) == len(quantised_layers(trainer.model))
    for name, f in hard.items():
        torch.testing.assert_close(f, ewc[name + ".weight"].data)
    assert any(not torch.allclose(hard[name], latent[name]) for name in latent)
    with torch.no_grad():
        for layer in quantised_layers(trainer.model):
            layer.weight.copy_(getattr(layer, relaxed_quant.GRID).hard(layer.weight))
    deployed, _ = script.weight_importances(trainer, dataset, "latent", cfg.batch_size)
    for name, f in hard.items():
        torch.testing.assert_close(f, deployed[name])
    script.main([str(run_dir), "--examples", "50"])
    out = capsys.readouterr().out
    assert all(f"| {forward} |" in out for forward in script.FORWARDS)

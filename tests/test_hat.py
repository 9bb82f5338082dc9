"""HAT: protection of past weights, regulariser, s annealing, embedding-gradient
compensation, stability in the task setting."""

import pytest
import torch
from clbench.strategies.hat import annealed_scale
from conftest import train_tasks
from torch.utils.data import DataLoader

from clbench.attention import AttentionLayer, attention_regulariser, compensate_embedding_gradient
from clbench.cli import main
from clbench.registry import get_strategy

HAT = get_strategy("hat")


def train(scenario_name, tasks, backbone="small_cnn", width=8, after_task=None):
    return train_tasks(HAT, scenario_name, "task", tasks, backbone, width, {}, after_task)


@torch.no_grad()
def accuracy(model, scenario, task):
    model.eval()
    correct = seen = 0
    for x, y, _ in DataLoader(scenario.benchmark.test_stream[task].dataset.eval(), batch_size=256):
        correct += (model.forward_single_task(x, task).argmax(1) == y).sum().item()
        seen += len(y)
    return correct / seen


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])
def test_weights_used_by_past_tasks_do_not_change(backbone, tiny_scenario):
    """Weights whose unit and input unit both have a cumulative mask above 0.999 after
    task 1 (gradients scaled by at most 0.001; in float32 sigmoid(400 e) mostly saturates
    to exactly 1) move by less than 1e-6 while tasks 2 and 3 are learned; others move."""
    state = {}

    def check(strategy, scenario, task):
        layers = strategy.model.path_layers
        if task == 0:
            state["accuracy"] = accuracy(strategy.model, scenario, 0)
            state["weights"] = [layer.layer.weight.detach().clone() for layer in layers]
            state["protected"] = [protected(layer) for layer in layers]
            assert any(p.any() for p in state["protected"])
            return
        for layer, before, used in zip(layers, state["weights"], state["protected"]):
            change = (layer.layer.weight.detach() - before).abs()
            if used.any():
                assert change[used].max() < 1e-6
            if (~used).any():
                assert change[~used].max() > 1e-4
        # Task 1 accuracy does not drop beyond a small tolerance.
        assert accuracy(strategy.model, scenario, 0) >= state["accuracy"] - 0.01

    train(tiny_scenario, 3, backbone=backbone, width=4 if backbone == "resnet18" else 8, after_task=check)


def protected(layer: AttentionLayer) -> torch.Tensor:
    weight = layer.layer.weight
    out = layer.cumulative.view((-1,) + (1,) * (weight.dim() - 1))
    inp = layer.cumulative_in.view((1, -1) + (1,) * (weight.dim() - 2))
    return (torch.minimum(out, inp) > 0.999).expand_as(weight)


def test_regulariser_counts_only_new_capacity():
    past = [torch.tensor([1.0, 1.0, 0.0, 0.0])]
    # Reusing what past tasks use is free; each unit past tasks left free costs 1 / (free units).
    assert attention_regulariser([torch.tensor([1.0, 1.0, 0.0, 0.0])], past) == 0
    assert attention_regulariser([torch.tensor([1.0, 0.0, 1.0, 0.0])], past) == pytest.approx(0.5)
    assert attention_regulariser([torch.tensor([1.0, 1.0, 1.0, 1.0])], past) == pytest.approx(1.0)
    # No capacity left by past tasks: nothing to regularise.
    assert attention_regulariser([torch.tensor([1.0, 1.0])], [torch.ones(2)]) == 0
    # First task: the mean mask.
    assert attention_regulariser([torch.tensor([1.0, 0.0, 0.0, 0.0])], [torch.zeros(4)]) == pytest.approx(0.25)


def test_s_is_annealed_from_one_over_s_max_within_each_epoch():
    schedule = [annealed_scale(b, 50, 400.0) for b in range(50)]
    assert schedule[0] == pytest.approx(1 / 400)
    assert all(a < b for a, b in zip(schedule, schedule[1:]))
    assert schedule[-1] == pytest.approx(1 / 400 + (400 - 1 / 400) * 49 / 50)


def test_embedding_compensation_matches_numerical_derivative():
    """Compensated gradient = upstream * s_max * d sigmoid(e) / de (checked by finite
    differences): as if the mask were sigmoid(s_max e) whatever s is now."""
    e = torch.tensor([-0.3, 0.0, 0.02, 0.5], dtype=torch.float64, requires_grad=True)
    upstream = torch.tensor([0.7, -1.2, 0.4, 2.0], dtype=torch.float64)
    s, s_max, h = 25.0, 400.0, 1e-6
    (torch.sigmoid(s * e) * upstream).sum().backward()
    compensated = compensate_embedding_gradient(e.grad, e.detach(), s, s_max, cosh_clamp=50.0)
    with torch.no_grad():
        numerical = (torch.sigmoid(e + h) - torch.sigmoid(e - h)) / (2 * h)
    assert torch.allclose(compensated, upstream * s_max * numerical, rtol=1e-6)


def test_plain_hat_in_the_class_setting_is_an_error_that_says_why(capsys):
    assert main(["run", "--strategy", "hat", "--setting", "class"]) == 2
    error = capsys.readouterr().err.strip()
    assert "task label" in error and "hat_tc" in error and len(error.splitlines()) == 1

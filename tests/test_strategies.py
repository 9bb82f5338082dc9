"""Every registered strategy, in every setting it declares, on a seconds-long scenario.

Parametrised over the registry: a new strategy file is tested without new test code."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from avalanche.models.utils import avalanche_forward
from conftest import train_tasks

from clbench.config import RunConfig
from clbench.models import RESNET_CHANNELS_LAST_MIN_WIDTH, ModelSpec
from clbench.registry import load_strategies
from clbench.runner import run

ROOT = Path(__file__).resolve().parents[1]

CASES = [(name, setting) for name, strategy in load_strategies().items() for setting in strategy.settings]


@pytest.mark.slow
@pytest.mark.parametrize("name,setting", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_strategy_runs_and_learns(name, setting, tiny_scenario, tmp_path):
    run_dir = run(RunConfig(scenario=tiny_scenario, strategy=name, setting=setting, epochs=2, batch_size=32,
                            results_dir=str(tmp_path))).run_dir
    assert (run_dir / "COMPLETED").exists()
    matrix = pd.read_csv(run_dir / "accuracy_matrix.csv", index_col="after_task").to_numpy()
    assert matrix.shape == (5, 5)
    assert ((matrix >= 0) & (matrix <= 1)).all()
    # Tasks are learned when trained: above chance (0.5 between a task's two classes,
    # 0.1 among all ten), the first task (digits 0 and 1) in particular.
    chance = 0.5 if setting == "task" else 0.1
    assert matrix[0, 0] > chance
    assert np.diag(matrix).mean() > 1.2 * chance


def test_every_strategy_declares_settings_and_documentation():
    for name, strategy in load_strategies().items():
        assert strategy.name == name
        assert set(strategy.settings) <= {"task", "class"} and strategy.settings
        assert strategy.summary(), f"{name} has no docstring"


def test_readme_shows_the_example_strategy_as_it_is():
    """README's "Writing a strategy" example is the file the registry loads and the
    tests above run."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Writing a strategy Avalanche does not have", 1)[1]
    shown = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert shown == (ROOT / "strategies" / "l2.py").read_text()


def test_l2_penalty_holds_weights_near_the_previous_task(tiny_scenario):
    def drift(l2_lambda):
        anchor = {}

        def record(trainer, scenario, task):
            weights = torch.cat([p.detach().flatten() for p in trainer.model.features.parameters()])
            anchor.setdefault("after_task_1", weights)
            anchor["last"] = weights

        train_tasks(load_strategies()["l2"], tiny_scenario, "task", 2, "small_cnn", 8, {"l2_lambda": l2_lambda},
                    record)
        return (anchor["last"] - anchor["after_task_1"]).norm()

    assert drift(10.0) < 0.5 * drift(0.0)


NETWORKS = [(name, setting, backbone) for name, setting in CASES for backbone in ("small_cnn", "resnet18")
            if name != "packnet" or backbone == "small_cnn"]


@pytest.mark.parametrize("name,setting,backbone", NETWORKS, ids=["-".join(case) for case in NETWORKS])
def test_every_strategys_network_runs_channels_last(name, setting, backbone):
    """The layout is the backbones' own choice (`clbench.models.channels_last`), so no
    strategy's network misses it: every image-shaped output of every module (convs,
    masked layers, PackNet's wrapped convs, pooling), in training and at test, is
    channels-last."""
    model = load_strategies()[name].from_hparams({}).make_model(
        ModelSpec(backbone, RESNET_CHANNELS_LAST_MIN_WIDTH, (1, 28, 28), setting, [[0, 1], [2, 3]]))
    layouts = []

    def record(module, args, out):
        out = out[0] if isinstance(out, tuple) else out
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[1] > 1:
            layouts.append(out.is_contiguous(memory_format=torch.channels_last))

    for module in model.modules():
        module.register_forward_hook(record)
    x, t = torch.rand(4, 1, 28, 28), torch.tensor([0, 0, 1, 1])
    avalanche_forward(model.train(), x, t)
    with torch.no_grad():
        avalanche_forward(model.eval(), x, t)
    assert layouts and all(layouts)

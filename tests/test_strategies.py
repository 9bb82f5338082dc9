"""Every registered strategy, in every setting it declares, on a seconds-long scenario.

Parametrised over the registry: a new strategy file is tested without new test code."""

import numpy as np
import pandas as pd
import pytest

from clbench.config import RunConfig
from clbench.registry import load_strategies
from clbench.runner import run

CASES = [(name, setting) for name, strategy in load_strategies().items() for setting in strategy.settings]


@pytest.mark.slow
@pytest.mark.parametrize("name,setting", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_strategy_runs_and_learns(name, setting, tiny_scenario, tmp_path):
    run_dir = run(RunConfig(scenario=tiny_scenario, strategy=name, setting=setting, epochs=2, batch_size=32,
                            results_dir=str(tmp_path)))
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

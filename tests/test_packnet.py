"""PackNet (Avalanche's, on clbench's multi-head network): a learned task's predictions
never change, also across a resumed checkpoint; the options it cannot run with are
one-line errors. The registry-driven tests in test_strategies.py run it too."""

import pytest
import torch
from conftest import run_until_first_checkpoint, train_tasks
from torch import nn

from clbench.cli import main
from clbench.config import RunConfig
from clbench.registry import load_strategies
from clbench.runner import run


def test_packnet_never_changes_a_learned_tasks_predictions(tiny_scenario):
    outputs = {}  # task -> its test logits after each later task

    @torch.no_grad()
    def record(trainer, scenario, trained):
        trainer.model.eval()
        for task, experience in enumerate(scenario.benchmark.test_stream[: trained + 1]):
            x, _, t = next(iter(torch.utils.data.DataLoader(experience.dataset.eval(), batch_size=1000)))
            outputs.setdefault(task, []).append(trainer.model(x, t))

    trainer, _ = train_tasks(load_strategies()["packnet"], tiny_scenario, "task", 5, "small_cnn", 8, {}, record)
    assert [len(logits) for logits in outputs.values()] == [5, 4, 3, 2, 1]
    for logits in outputs.values():
        assert all(torch.equal(later, logits[0]) for later in logits[1:])
    assert all(type(head) is nn.Linear for head in trainer.model.wrappee.heads)  # each task's own, never pruned
    # The last task is not pruned: every weight belongs to one of the five tasks, none to a sixth.
    assert all(module.task_index.max() < 5 for module in trainer.model.modules() if hasattr(module, "task_index"))


def test_a_resumed_packnet_run_keeps_its_frozen_weights(tiny_scenario, tmp_path, capsys):
    options = {"scenario": tiny_scenario, "strategy": "packnet", "epochs": 2, "width": 4}
    reference = run(RunConfig(results_dir=str(tmp_path / "a"), **options)).run_dir
    config = RunConfig(results_dir=str(tmp_path / "b"), **options)
    run_until_first_checkpoint(config)
    capsys.readouterr()
    resumed = run(config).run_dir
    assert "after task 1" in capsys.readouterr().err
    assert (resumed / "accuracy_matrix.csv").read_text() == (reference / "accuracy_matrix.csv").read_text()


@pytest.mark.parametrize("args,message", [
    (["--setting", "class", "--epochs", "2"], "supports only the task setting"),
    ([], "needs --epochs above that; got --epochs 1"),
    (["--epochs", "3", "--hp", "post_prune_epochs=3"], "needs --epochs above that; got --epochs 3"),
    (["--epochs", "2", "--backbone", "resnet18"], "packnet needs the small_cnn backbone"),
    (["--epochs", "2", "--hp", "prune_proportion=1"], "invalid hyperparameters for 'packnet'"),
])
def test_packnet_refuses_what_it_cannot_run_with_one_line(args, message, tiny_scenario, tmp_path, capsys):
    assert main(["run", "--scenario", tiny_scenario, "--strategy", "packnet", "--results-dir", str(tmp_path),
                 *args]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / tiny_scenario).exists()

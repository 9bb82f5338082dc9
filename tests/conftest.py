import dataclasses
import importlib.util
from functools import partial
from pathlib import Path

import pytest
import torch
from avalanche.training.plugins import EvaluationPlugin
from clbench.datasets.images import ImageArrayDataset
from clbench.datasets.loaders import load_split_mnist_mini
from clbench.datasets.scenarios import SCENARIOS, build_scenario

from clbench import checkpoint
from clbench.models import ModelSpec
from clbench.registry import TrainingSetup
from clbench.runner import run

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def load_script(folder: str, name: str):
    """`<folder>/<name>.py` of the repository (benchmarks/, scripts/), imported as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason=f"real MNIST not found at {SHARED_DATA} (only on the team's machines)")


def first_per_class(dataset: ImageArrayDataset, per_class: int) -> ImageArrayDataset:
    targets = torch.tensor(dataset.targets)
    index = torch.cat([torch.nonzero(targets == c).flatten()[:per_class] for c in targets.unique()])
    return ImageArrayDataset(dataset.images[index], targets[index])


def load_tiny(root, cache):
    train, test, _ = load_split_mnist_mini(root, cache)
    return first_per_class(train, 100), first_per_class(test, 20), "tiny test subset of split_mnist_mini"


def tiny_spec():
    """The embedded MNIST subset cut to 100 train / 20 test images per class, as scenario
    'tiny': every strategy runs on it in seconds."""
    return dataclasses.replace(SCENARIOS["split_mnist_mini"], name="tiny", load=load_tiny)


# `python -c TINY_CLI clbench-arguments...`: the command line with the tiny scenario registered.
TINY_CLI = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import conftest; "
            "from clbench.datasets.scenarios import SCENARIOS; SCENARIOS['tiny'] = conftest.tiny_spec(); "
            "from clbench.cli import main; sys.exit(main(sys.argv[1:]))")


def register_tiny(monkeypatch) -> str:
    monkeypatch.setitem(SCENARIOS, "tiny", tiny_spec())
    return "tiny"


def train_tasks(strategy_cls, scenario_name, setting, tasks, backbone, width, hparams, after_task=None, plugins=()):
    """Train a strategy on the first `tasks` tasks of a 28x28 scenario (2 epochs, batch 32,
    SGD 0.01 unless the strategy has its own optimiser), with `plugins` (a module's);
    `after_task(trainer, scenario, task)` runs after each."""
    torch.manual_seed(0)
    scenario = build_scenario(scenario_name, setting, None, 0, False)
    strategy = strategy_cls.from_hparams(hparams)
    model = strategy.make_model(ModelSpec(backbone, width, (1, 28, 28), setting, scenario.task_classes))
    setup = TrainingSetup(make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
                          criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=2,
                          eval_mb_size=256, device="cpu", plugins=list(plugins),
                          evaluator=partial(EvaluationPlugin, loggers=[]))
    trainer = strategy.make_trainer(model, setup)
    for task, experience in enumerate(scenario.benchmark.train_stream[:tasks]):
        trainer.train(experience)
        if after_task:
            after_task(trainer, scenario, task)
    return trainer, scenario


class Interrupted(Exception):
    pass


def run_until_first_checkpoint(config) -> None:
    """Run `config` and stop it, as if killed, once it has checkpointed its first task."""
    save = checkpoint.save

    def save_and_stop(*args):
        assert save(*args), "no checkpoint written"
        raise Interrupted

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(checkpoint, "save", save_and_stop)
        with pytest.raises(Interrupted):
            run(config)


@pytest.fixture
def tiny_scenario(monkeypatch) -> str:
    return register_tiny(monkeypatch)


@pytest.fixture(scope="module")
def tiny_scenario_module():
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield register_tiny(monkeypatch)

"""Batches of in-memory data (`clbench.loading`): the batches Avalanche's loader gives, from
the same random draws, so that training is the same bit for bit."""

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils.data_loader import TaskBalancedDataLoader
from avalanche.core import SupervisedPlugin
from clbench.datasets.images import ImageArrayDataset, transforms
from clbench.datasets.scenarios import build_scenario
from torch.utils.data import DataLoader

from clbench.loading import InMemoryBatches, TensorBatches, eval_batches, tensor_batches
from clbench.models import ModelSpec
from clbench.registry import TrainingSetup, get_strategy
from clbench.runner import SilentEvaluation


def assert_same_batches(batches, expected) -> None:
    for batch, expected_batch in zip(batches, expected, strict=True):
        for tensor, expected_tensor in zip(batch, expected_batch, strict=True):
            assert tensor.dtype == expected_tensor.dtype and torch.equal(tensor, expected_tensor)


@pytest.mark.parametrize("setting", ["task", "class"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_tensor_batches_are_avalanches_batches_from_the_same_draws(setting, drop_last):
    experience = build_scenario("split_mnist_mini", setting).benchmark.train_stream[1]
    dataset = experience.dataset.train().subset(torch.randperm(2000)[:300].tolist())  # as ccgn holds some out
    torch.manual_seed(0)
    expected = list(TaskBalancedDataLoader(dataset, batch_size=32, shuffle=True, drop_last=drop_last,
                                           oversample_small_groups=True))
    state_after = torch.get_rng_state()
    torch.manual_seed(0)
    batches = tensor_batches(dataset, 32, shuffle=True, drop_last=drop_last)
    assert len(batches) == len(expected) == (9 if drop_last else 10)
    assert_same_batches(batches, expected)
    assert torch.equal(torch.get_rng_state(), state_after)


def test_eval_batches_are_pytorchs_from_the_same_draw():
    dataset = build_scenario("split_mnist_mini", "class").benchmark.test_stream[2].dataset.eval()
    torch.manual_seed(0)
    expected = list(DataLoader(dataset, batch_size=128))
    state_after = torch.get_rng_state()
    torch.manual_seed(0)
    batches = eval_batches(dataset, 128)
    assert isinstance(batches, TensorBatches)
    assert_same_batches(batches, expected)
    assert torch.equal(torch.get_rng_state(), state_after)


def test_transformed_inputs_are_left_to_avalanche():
    images = ImageArrayDataset(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), [0, 1, 2, 3] * 2)
    train_transform, eval_transform = transforms("cifar10", augment=True)
    benchmark = nc_benchmark(images, images, n_experiences=2, task_labels=False, train_transform=train_transform,
                             eval_transform=eval_transform)
    assert tensor_batches(benchmark.train_stream[0].dataset.train(), 2, shuffle=True, drop_last=False) is None


class LoaderProbe(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.loaders = []

    def before_training_epoch(self, strategy, **kwargs):
        self.loaders.append(type(strategy.dataloader))


@pytest.mark.parametrize("strategy_name", ["naive", "ccgn"])
def test_training_with_in_memory_batches_gives_the_same_weights(strategy_name, tiny_scenario):
    """naive on Avalanche's template and loader; ccgn on clbench's, holding data out and
    dropping the last partial batch."""
    scenario = build_scenario(tiny_scenario, "task")
    strategy = get_strategy(strategy_name).from_hparams({})

    def trained(plugins):
        torch.manual_seed(0)
        model = strategy.make_model(ModelSpec("small_cnn", 8, (1, 28, 28), "task", scenario.task_classes))
        setup = TrainingSetup(make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
                              criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=2,
                              eval_mb_size=256, device="cpu", plugins=plugins, evaluator=SilentEvaluation)
        trainer = strategy.make_trainer(model, setup)
        for experience in scenario.benchmark.train_stream[:2]:
            trainer.train(experience)
        return trainer.model.state_dict()

    probe = LoaderProbe()
    fast = trained([InMemoryBatches(), probe])
    assert probe.loaders == [TensorBatches] * 4
    reference = trained([])
    assert fast.keys() == reference.keys()
    assert all(torch.equal(fast[name], reference[name]) for name in fast)

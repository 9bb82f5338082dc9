import numpy as np
import pytest
import torch
from clbench.datasets.loaders import MNIST_FILES
from clbench.datasets.scenarios import build_scenario
from conftest import SHARED_DATA, needs_shared_data

from clbench.errors import UserError


@pytest.mark.parametrize("setting", ["task", "class"])
def test_split_mnist_mini_splits_classes_into_tasks(setting):
    scenario = build_scenario("split_mnist_mini", setting)
    assert scenario.task_classes == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    for stream, per_class in ((scenario.benchmark.train_stream, 1000), (scenario.benchmark.test_stream, 200)):
        for index, experience in enumerate(stream):
            assert len(experience.dataset) == 2 * per_class
            x, y, t = experience.dataset[0]
            assert x.shape == (1, 28, 28) and x.dtype == torch.float32
            labels = set(experience.dataset.targets)
            if setting == "task":
                assert experience.task_label == index and labels == {0, 1}
            else:
                assert experience.task_label == 0 and labels == set(scenario.task_classes[index])


def test_same_split_in_both_settings():
    task, cls = (build_scenario("split_mnist_mini", s) for s in ("task", "class"))
    x_task = task.benchmark.test_stream[3].dataset[5][0]
    x_class = cls.benchmark.test_stream[3].dataset[5][0]
    assert torch.equal(x_task, x_class)


def test_shuffled_class_order_depends_on_seed():
    orders = {str(build_scenario("split_mnist_mini", "class", seed=s, shuffle_classes=True).task_classes) for s in range(3)}
    assert len(orders) > 1


def test_missing_mnist_offline_names_expected_files(tmp_path, monkeypatch):
    monkeypatch.setattr("clbench.datasets.loaders.network_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(UserError) as error:
        build_scenario("split_mnist", "task", data_root=tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert all(name in message for name in MNIST_FILES) and str(tmp_path / "MNIST" / "raw") in message


def test_corrupt_mnist_is_a_clear_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw / name).write_bytes(b"not an idx file")
    with pytest.raises(UserError, match="corrupt"):
        build_scenario("split_mnist", "task", data_root=tmp_path)


def test_unknown_scenario_lists_choices():
    with pytest.raises(UserError, match="split_mnist_mini"):
        build_scenario("split_mnits", "task")


@needs_shared_data
def test_full_split_mnist_from_data_root():
    scenario = build_scenario("split_mnist", "class", data_root=SHARED_DATA)
    sizes = [len(e.dataset) for e in scenario.benchmark.train_stream]
    assert sum(sizes) == 60000 and sum(len(e.dataset) for e in scenario.benchmark.test_stream) == 10000
    assert np.array_equal(sorted(scenario.benchmark.train_stream[2].dataset.targets.uniques), [4, 5])

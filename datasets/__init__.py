"""Scenarios: real datasets split into tasks, built with Avalanche's `nc_benchmark`.

A scenario is one dataset split into `n_tasks` tasks of disjoint classes. The same split
serves both settings: `task` (task label at train and test time, class ids from 0 within
each task for a multi-head model) and `class` (task label 0 everywhere, original class
ids, one head over all classes).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np
import torch
from avalanche.benchmarks import nc_benchmark
from torch.utils.data import Dataset

from clbench.errors import UserError

SETTINGS = ("task", "class")
DATA_ROOT_ENV = "CLBENCH_DATA_ROOT"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the usual MNIST normalisation (as Avalanche's SplitMNIST)


class TensorImageDataset(Dataset):
    """Images already decoded and normalised in memory; `targets` is what Avalanche reads."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images = images
        self.targets = targets.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


def mnist_tensors(images: np.ndarray | torch.Tensor, labels) -> TensorImageDataset:
    """uint8 N x 28 x 28 images -> normalised float N x 1 x 28 x 28."""
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0
    return TensorImageDataset((x - MNIST_MEAN) / MNIST_STD, torch.as_tensor(labels, dtype=torch.long))


@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    description: str
    input_shape: tuple[int, int, int]
    n_classes: int
    n_tasks: int
    load: Callable[[Path], tuple[Dataset, Dataset, str]]  # data root -> (train, test, source)
    needs_data_root: bool = True


@dataclass(frozen=True)
class Scenario:
    """A built scenario for one setting: the Avalanche benchmark plus what models need."""

    spec: ScenarioSpec
    setting: str
    benchmark: object  # Avalanche NCScenario
    task_classes: list[list[int]]  # original class ids of each task
    source: str

    @property
    def n_tasks(self) -> int:
        return len(self.task_classes)


def load_split_mnist_mini(_root: Path) -> tuple[Dataset, Dataset, str]:
    path = resources.files("clbench.datasets") / "split_mnist_mini" / "split_mnist_mini.npz"
    with resources.as_file(path) as file, np.load(file) as data:
        train = mnist_tensors(data["x_train"], data["y_train"])
        test = mnist_tensors(data["x_test"], data["y_test"])
    return train, test, "MNIST subset shipped with clbench (1,000 train / 200 test images per class)"


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def network_reachable(url: str, timeout: float = 3.0) -> bool:
    host = urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_mnist(root: Path) -> tuple[Dataset, Dataset, str]:
    from torchvision.datasets import MNIST

    raw = root / "MNIST" / "raw"
    missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    if missing and not network_reachable(MNIST.mirrors[0]):
        raise UserError(
            f"MNIST not found: expected {', '.join(MNIST_FILES)} in {raw} (missing: {', '.join(missing)}) "
            f"and no network to download them; put the files there, or pass --data-root DIR "
            f"(or set {DATA_ROOT_ENV}) pointing at the folder that contains MNIST/raw"
        )
    try:
        train, test = (MNIST(str(root), train=flag, download=bool(missing)) for flag in (True, False))
    except Exception as error:  # torchvision signals bad files with assertions, ValueErrors, ...
        raise UserError(f"MNIST files in {raw} are unreadable or corrupt ({error}); delete them and download again") from None
    return mnist_tensors(train.data, train.targets), mnist_tensors(test.data, test.targets), f"MNIST, full ({raw})"


SCENARIOS: dict[str, ScenarioSpec] = {
    spec.name: spec
    for spec in (
        ScenarioSpec(
            "split_mnist_mini",
            "Embedded real MNIST subset (10k train / 2k test), 5 tasks of 2 digits; no download",
            (1, 28, 28), 10, 5, load_split_mnist_mini, needs_data_root=False,
        ),
        ScenarioSpec(
            "split_mnist",
            "Full MNIST (60k train / 10k test), 5 tasks of 2 digits; read from the data root",
            (1, 28, 28), 10, 5, load_mnist,
        ),
    )
}


def default_data_root() -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV) or Path.home() / ".cache" / "clbench" / "data")


def build_scenario(name: str, setting: str, data_root: Path | None = None, seed: int = 0,
                   shuffle_classes: bool = False) -> Scenario:
    """Split `name` into tasks for `setting`; classes in id order unless `shuffle_classes` (then by `seed`)."""
    if name not in SCENARIOS:
        raise UserError(f"unknown scenario {name!r}; choose one of: {', '.join(SCENARIOS)}")
    if setting not in SETTINGS:
        raise UserError(f"unknown setting {setting!r}; choose 'task' or 'class'")
    spec = SCENARIOS[name]
    train, test, source = spec.load(Path(data_root) if data_root else default_data_root())
    task_aware = setting == "task"
    benchmark = nc_benchmark(
        train, test, n_experiences=spec.n_tasks, task_labels=task_aware,
        shuffle=shuffle_classes, seed=seed, class_ids_from_zero_in_each_exp=task_aware,
    )
    return Scenario(spec, setting, benchmark, [list(c) for c in benchmark.original_classes_in_exp], source)

import dataclasses
from pathlib import Path

import pytest
import torch

from clbench.datasets import SCENARIOS, TensorImageDataset, load_split_mnist_mini

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason=f"real MNIST not found at {SHARED_DATA} (only on the team's machines)")


def first_per_class(dataset: TensorImageDataset, per_class: int) -> TensorImageDataset:
    targets = torch.tensor(dataset.targets)
    index = torch.cat([torch.nonzero(targets == c).flatten()[:per_class] for c in targets.unique()])
    return TensorImageDataset(dataset.images[index], targets[index])


def register_tiny(monkeypatch) -> str:
    """The embedded MNIST subset cut to 100 train / 20 test images per class, registered
    as scenario 'tiny': every strategy runs on it in seconds."""

    def load(root, cache):
        train, test, _ = load_split_mnist_mini(root, cache)
        return first_per_class(train, 100), first_per_class(test, 20), "tiny test subset of split_mnist_mini"

    monkeypatch.setitem(SCENARIOS, "tiny", dataclasses.replace(SCENARIOS["split_mnist_mini"], name="tiny", load=load))
    return "tiny"


@pytest.fixture
def tiny_scenario(monkeypatch) -> str:
    return register_tiny(monkeypatch)


@pytest.fixture(scope="module")
def tiny_scenario_module():
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield register_tiny(monkeypatch)

"""Batches of in-memory tensor data, gathered with one index per batch.

Avalanche's `TaskBalancedDataLoader` fetches every sample through its dataset layers
(subsets, data attributes, transform groups), collates them and, every epoch, walks the
dataset tree to check for FFCV: about 1 ms per batch of 32 on this CPU, where PyTorch's
DataLoader over a TensorDataset takes 0.3 ms; 6-7% of a small CNN's training step. For a
task whose samples are rows of one `ImageArrayDataset` with no input transform (the
MNIST scenarios), `InMemoryBatches` replaces the template's loader with `TensorBatches`:
the same batches in the same order from the same random draws, so results do not change.
clbench's evaluation reads its test sets the same way (`eval_batches`).
"""

from __future__ import annotations

import torch
from avalanche.benchmarks.utils.data_loader import TaskBalancedDataLoader
from avalanche.benchmarks.utils.dataset_traversal_utils import single_flat_dataset
from avalanche.benchmarks.utils.transforms import TupleTransform
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader

from clbench.datasets.images import ImageArrayDataset


class TensorBatches:
    """Batches (inputs, targets, task labels) of an Avalanche dataset that is rows of an
    in-memory image tensor. The positions come from a PyTorch DataLoader over the sample
    positions, which draws from the global generator exactly as Avalanche's loader of one
    task does (a seed when an epoch starts, one for the shuffle)."""

    def __init__(self, images: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, task_labels: torch.Tensor,
                 batch_size: int, shuffle: bool, drop_last: bool):
        self.images, self.rows, self.targets, self.task_labels = images, rows, targets, task_labels
        self.positions = DataLoader(range(len(rows)), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                    collate_fn=torch.tensor)

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self):
        for positions in self.positions:
            yield self.images[self.rows[positions]], self.targets[positions], self.task_labels[positions]


def tensor_batches(dataset, batch_size: int, shuffle: bool, drop_last: bool) -> TensorBatches | None:
    """`TensorBatches` of an Avalanche dataset, or None where its samples are not rows of
    one `ImageArrayDataset` or something transforms the inputs. Targets and task labels
    are the dataset's own attributes (after Avalanche's relabelling)."""
    flat = single_flat_dataset(dataset)
    if flat is None:
        return None
    leaf, rows, transforms = flat
    if not isinstance(leaf, ImageArrayDataset) or any(
            not isinstance(transform, TupleTransform) or transform.flat_transforms(0) for transform in transforms):
        return None
    return TensorBatches(leaf.images, torch.tensor(rows), torch.tensor(list(dataset.targets)),
                         torch.tensor(list(dataset.targets_task_labels)), batch_size, shuffle, drop_last)


def eval_batches(dataset, batch_size: int):
    """An Avalanche dataset in order: `TensorBatches` where it is in-memory rows, else
    PyTorch's loader over it (which draws the same seed from the global generator)."""
    batches = tensor_batches(dataset, batch_size, shuffle=False, drop_last=False)
    return DataLoader(dataset, batch_size=batch_size) if batches is None else batches


class InMemoryBatches(SupervisedPlugin):
    """Before each task, replaces the template's loader with `TensorBatches` where it is
    Avalanche's task-balanced loader of a single task over in-memory rows (the loaders of
    replay and joint training over several tasks are left as they are)."""

    def before_training_exp(self, strategy, **kwargs):
        loader = strategy.dataloader
        if type(loader) is TaskBalancedDataLoader and len(loader.datasets) == 1:
            options = loader.loader_kwargs
            batches = tensor_batches(strategy.adapted_dataset, loader.batch_sizes[0], options["shuffle"],
                                     options["drop_last"])
            if batches is not None:
                strategy.dataloader = batches

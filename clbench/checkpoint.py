"""Checkpoints after every task, so that an interrupted run resumes from its last
finished task instead of its first.

A checkpoint is the whole Avalanche template (model, optimiser, plugins with their
state: EWC's importances, SI's path integrals, LwF's previous model, replay and
task-classifier memories, gate and mask statistics), the random-number generators
(Avalanche's RNG manager) and the runner's rows so far, pickled with dill as Avalanche's
own `save_checkpoint` does. Classes are pickled by reference, so a checkpoint is read
by the same code that wrote it.

The scenario's loaded datasets are pickled as references, not copied: a memory of 500
examples is a view of the whole training set, which would otherwise be written with it
(190 MB for full MNIST). The resumed run loads the same data (checked by its
fingerprint) and the references resolve to it.

Modules parametrised with `torch.nn.utils.parametrize` (the ltp module's soft thresholds),
which PyTorch refuses to pickle, are pickled as their plain class and state and
parametrised again on loading, their original tensors the same objects (the optimiser
holds them).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import dill
from avalanche.training.determinism.rng_manager import RNGManager
from torch import nn
from torch.nn.utils import parametrize

from clbench.results import CHECKPOINT, atomic_write


class _Pickler(dill.Pickler):
    def __init__(self, file, shared: tuple):
        super().__init__(file, byref=True)
        self.shared = {id(obj): index for index, obj in enumerate(shared)}

    def persistent_id(self, obj):
        return self.shared.get(id(obj))

    def reducer_override(self, obj):
        if isinstance(obj, nn.Module) and parametrize.is_parametrized(obj):
            plain = type(obj).__bases__[0]  # parametrize made the module's class a subclass of it
            return object.__new__, (plain,), obj.__dict__, None, None, _parametrise_again
        return NotImplemented


def _parametrise_again(module: nn.Module, state: dict) -> None:
    module.__dict__.update(state)
    for name, chain in module._modules.pop("parametrizations").items():
        module._parameters[name] = chain.original
        for parametrization in chain:
            parametrize.register_parametrization(module, name, parametrization, unsafe=chain.unsafe)


class _Unpickler(dill.Unpickler):
    def __init__(self, file, shared: tuple):
        super().__init__(file)
        self.shared = shared

    def persistent_load(self, index):
        return self.shared[index]


def save(folder: Path, trainer, progress: dict, scenario) -> bool:
    """Write `trainer`, the generators' states and the runner's `progress` atomically,
    referring to `scenario`'s datasets; False (with a warning) where the strategy holds
    something that cannot be pickled."""
    state = {"trainer": trainer, "rng": RNGManager, "progress": progress, "data": scenario.data_fingerprint}

    def write(path: Path) -> None:
        with open(path, "wb") as file, warnings.catch_warnings():
            # dill notes classes it finds under another name, then pickles them
            warnings.simplefilter("ignore", dill.PicklingWarning)
            _Pickler(file, scenario.splits).dump(state)

    try:
        atomic_write(folder / CHECKPOINT, write)
        return True
    except (TypeError, dill.PicklingError, AttributeError) as error:
        warnings.warn(f"no checkpoint for this run, it will restart from its first task if interrupted "
                      f"({type(error).__name__}: {error})", stacklevel=2)
        return False


def load(folder: Path, scenario) -> dict | None:
    """The checkpoint in `folder` (restoring the random-number generators), or None where
    there is none, or it cannot be read or was written on other data (with a warning)."""
    if not (folder / CHECKPOINT).exists():
        return None
    try:
        # Avalanche's unpickler of torch.device prints a line for each: kept off stdout,
        # where the scripts that study a checkpoint print their tables.
        with open(folder / CHECKPOINT, "rb") as file, contextlib.redirect_stdout(io.StringIO()):
            state = _Unpickler(file, scenario.splits).load()
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint (old code, damaged file)
        warnings.warn(f"unreadable checkpoint {folder / CHECKPOINT} ({type(error).__name__}: {error}); "
                      "the run starts from its first task", stacklevel=2)
        return None
    if state.get("data") != scenario.data_fingerprint:
        warnings.warn(f"the checkpoint {folder / CHECKPOINT} was written on other data (fingerprint "
                      f"{state.get('data')}, now {scenario.data_fingerprint}); the run starts from its first task",
                      stacklevel=2)
        return None
    return state

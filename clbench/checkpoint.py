"""Checkpoints after every task, so that an interrupted run resumes from its last
finished task instead of its first.

A checkpoint is the whole Avalanche template (model, optimiser, plugins with their
state: EWC's importances, SI's path integrals, LwF's previous model, replay and
task-classifier memories, gate and mask statistics), the random-number generators
(Avalanche's RNG manager) and the runner's rows so far, pickled with dill as Avalanche's
own `save_checkpoint` does. Classes are pickled by reference, so a checkpoint is read
by the same code that wrote it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import dill
import torch
from avalanche.training.determinism.rng_manager import RNGManager

from clbench.results import CHECKPOINT, atomic_write


def save(folder: Path, trainer, progress: dict) -> bool:
    """Write `trainer`, the generators' states and the runner's `progress` atomically;
    False (with a warning) where the strategy holds something that cannot be pickled."""
    state = {"trainer": trainer, "rng": RNGManager, "progress": progress}
    byref = dill.settings["byref"]
    dill.settings["byref"] = True
    try:
        with warnings.catch_warnings():  # dill notes classes it finds under another name, then pickles them
            warnings.simplefilter("ignore", dill.PicklingWarning)
            atomic_write(folder / CHECKPOINT, lambda path: torch.save(state, path, pickle_module=dill))
        return True
    except (TypeError, dill.PicklingError, AttributeError) as error:
        warnings.warn(f"no checkpoint for this run, it will restart from its first task if interrupted "
                      f"({type(error).__name__}: {error})", stacklevel=2)
        return False
    finally:
        dill.settings["byref"] = byref


def load(folder: Path) -> dict | None:
    """The checkpoint in `folder` (restoring the random-number generators), or None."""
    if not (folder / CHECKPOINT).exists():
        return None
    try:
        return torch.load(folder / CHECKPOINT, pickle_module=dill, weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint (old code, damaged file)
        warnings.warn(f"unreadable checkpoint {folder / CHECKPOINT} ({type(error).__name__}: {error}); "
                      "the run starts from its first task", stacklevel=2)
        return None

"""Strategy registry: one module per strategy in `clbench.strategies`, registered by name.

Adding a strategy means adding one file to `strategies/` that subclasses `Strategy` and
decorates it with `@register`; `load_strategies` imports every module of the package,
and import errors surface instead of being swallowed.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from clbench.errors import UserError, describe_validation_error
from clbench.models import build_model


class Hyperparameters(BaseModel):
    """Typed hyperparameters with their defaults; an unknown name is an error."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class TrainingLoop:
    """What every strategy shares: optimiser, loss, batch sizes, epochs, device, plugins."""

    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
    criterion: torch.nn.Module
    train_mb_size: int
    train_epochs: int
    eval_mb_size: int
    device: str
    plugins: list = field(default_factory=list)
    evaluator: Callable = None

    def template_kwargs(self) -> dict:
        """Keyword arguments for an Avalanche template (a fresh plugin list each call:
        some Avalanche strategies append to the list they are given)."""
        return dict(train_mb_size=self.train_mb_size, train_epochs=self.train_epochs,
                    eval_mb_size=self.eval_mb_size, device=self.device,
                    plugins=list(self.plugins), evaluator=self.evaluator)


class Strategy:
    """A continual-learning strategy: its name, the settings it supports, its
    hyperparameters and how to build the Avalanche template that trains it."""

    name: ClassVar[str]
    settings: ClassVar[tuple[str, ...]] = ("task", "class")
    Hparams: ClassVar[type[Hyperparameters]] = Hyperparameters
    # True for joint training: row i of the accuracy matrix comes from a fresh model
    # trained on tasks 1..i together, instead of continuing from the previous row.
    retrain_from_scratch: ClassVar[bool] = False
    # Why a setting is not supported, and what to use instead (shown in the error).
    setting_hint: ClassVar[dict[str, str]] = {}

    def build(self, model: torch.nn.Module, hp: Hyperparameters, loop: TrainingLoop):
        """The trainer: an object with `train(experience)` and `model` (an Avalanche
        template). It may also have `artifacts()`, returning named tables to save with
        the run (see `clbench.results`)."""
        raise NotImplementedError

    @classmethod
    def stored_examples(cls, hp: Hyperparameters, scenario) -> int:
        """Training examples kept in memory after the last task (reported with every run)."""
        return 0

    @classmethod
    def make_model(cls, hp: Hyperparameters, backbone: str, width: int, input_shape: tuple[int, int, int],
                   setting: str, task_classes: list[list[int]], n_classes: int) -> torch.nn.Module:
        """The network this strategy trains; strategies with their own architecture override it."""
        return build_model(backbone, width, input_shape, setting, task_classes, n_classes)

    @classmethod
    def summary(cls) -> str:
        """The docstring's first paragraph on one line."""
        return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())

    @classmethod
    def parse_hparams(cls, values: dict) -> Hyperparameters:
        try:
            return cls.Hparams(**values)
        except ValidationError as error:
            known = ", ".join(cls.Hparams.model_fields) or "none"
            raise UserError(f"invalid hyperparameters for {cls.name!r}: {describe_validation_error(error)} "
                            f"(known: {known})") from None


_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"strategy name {cls.name!r} registered twice "
                         f"({_REGISTRY[cls.name].__module__} and {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def load_strategies() -> dict[str, type[Strategy]]:
    import clbench.strategies as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    return dict(sorted(_REGISTRY.items()))


def get_strategy(name: str) -> type[Strategy]:
    strategies = load_strategies()
    if name not in strategies:
        raise UserError(f"unknown strategy {name!r}; choose one of: {', '.join(strategies)}")
    return strategies[name]

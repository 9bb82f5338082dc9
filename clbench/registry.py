"""Strategy registry: one module per strategy in `clbench.strategies`, registered by name.

Adding a strategy means adding one file to `strategies/` that subclasses `Strategy` and
decorates it with `@register`; `load_strategies` imports every module of the package,
and import errors surface instead of being swallowed. README's "Writing a strategy"
walks through a complete example (`strategies/l2.py`).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from avalanche.core import SupervisedPlugin
from pydantic import BaseModel, ConfigDict, ValidationError

from clbench.errors import UserError, describe_validation_error
from clbench.models import ModelSpec, build_model


class Hyperparameters(BaseModel):
    """Typed hyperparameters with their defaults; an unknown name or a non-finite number
    is an error."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass
class TrainingSetup:
    """The run's training options, as every strategy's Avalanche template takes them.

    `plugins` are clbench's own (the progress bar, which also counts iterations whose
    loss is not finite): pass them on through `template_kwargs`, or the run reports no
    divergence."""

    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]  # the run's --optimizer, --lr, --momentum
    criterion: torch.nn.Module
    train_mb_size: int
    train_epochs: int
    eval_mb_size: int
    device: str
    plugins: list[SupervisedPlugin] = field(default_factory=list)
    evaluator: Callable = None

    def template_kwargs(self, extra_plugins: list[SupervisedPlugin] = ()) -> dict:
        """Keyword arguments for an Avalanche template, with clbench's plugins followed by
        the strategy's own (a fresh list each call: some templates append to it)."""
        return dict(train_mb_size=self.train_mb_size, train_epochs=self.train_epochs,
                    eval_mb_size=self.eval_mb_size, device=self.device,
                    plugins=[*self.plugins, *extra_plugins], evaluator=self.evaluator)


OPTIMIZER_OPTIONS = ("optimizer", "lr", "momentum")  # the run's; what a strategy with its own optimiser replaces


class Strategy:
    """A continual-learning strategy: its name, the settings it supports, its typed
    hyperparameters (`self.hp`), the network it trains and the Avalanche template that
    trains it. Subclasses set the class attributes and override `make_trainer`; the rest
    has defaults."""

    name: ClassVar[str]
    settings: ClassVar[tuple[str, ...]] = ("task", "class")
    Hparams: ClassVar[type[Hyperparameters]] = Hyperparameters
    # True for joint training: row i of the accuracy matrix comes from a fresh model
    # trained on tasks 1..i together, instead of continuing from the previous row.
    retrain_from_scratch: ClassVar[bool] = False
    # Why a setting is not supported, and what to use instead (shown in the error).
    setting_hint: ClassVar[dict[str, str]] = {}
    # Run-level options the strategy replaces with hyperparameters of its own (OPTIMIZER_OPTIONS
    # for its own optimiser): giving one is an error, and the run records it as null.
    own_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hp: Hyperparameters):
        self.hp = hp

    @classmethod
    def from_hparams(cls, values: dict) -> Strategy:
        """The strategy with `values` over its hyperparameters' defaults; a one-line
        `UserError` for an unknown name or an invalid value."""
        try:
            return cls(cls.Hparams(**values))
        except ValidationError as error:
            known = ", ".join(cls.Hparams.model_fields) or "none"
            raise UserError(f"invalid hyperparameters for {cls.name!r}: {describe_validation_error(error)} "
                            f"(known: {known})") from None

    def make_model(self, spec: ModelSpec) -> torch.nn.Module:
        """The network to train; strategies with their own architecture override it."""
        return build_model(spec)

    def make_trainer(self, model: torch.nn.Module, setup: TrainingSetup):
        """An Avalanche template (`train(experience)`, `model`) that trains `model`. It may
        also have `artifacts()`, returning named tables to save with the run."""
        raise NotImplementedError

    def stored_examples(self, scenario) -> int:
        """Training examples kept in memory after the last task (reported with every run);
        a strategy with a memory must return its real size."""
        return 0

    @classmethod
    def summary(cls) -> str:
        """The docstring's first paragraph on one line."""
        return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())


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

"""Strategy and module registries: one file per strategy in `clbench.strategies` and one
per module in `clbench.modules`, each registered by name.

Adding a strategy means adding one file to `strategies/` that subclasses `Strategy` and
decorates it with `@register`; `load_strategies` imports every module of the package,
and import errors surface instead of being swallowed. README's "Writing a strategy"
walks through a complete example (`strategies/l2.py`). Modules (compression, gating)
attach to any strategy the same way: a `Module` subclass in `modules/`, decorated with
`@register_module`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from avalanche.core import SupervisedPlugin
from pydantic import BaseModel, ConfigDict, ValidationError
from torch.utils.data import Dataset

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
    loss is not finite, and `clbench.loading.InMemoryBatches`): pass them on through
    `template_kwargs`, or the run reports no divergence and loads in-memory data slowly."""

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


def build_optimizer(name: str, parameters, lr: float, momentum: float = 0.0) -> torch.optim.Optimizer:
    """SGD (with `momentum`) or Adam. Adam is fused: one kernel updates all parameters,
    instead of about ten small operations per parameter tensor, which weigh on ccgn with
    its gates' many small tensors (benchmarks/train_overhead.py). SGD is not: PyTorch 2.15's fused SGD with momentum
    fails on a step where a parameter gets its first gradient beside parameters that
    already have momentum (a later task's head)."""
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum)
    return torch.optim.Adam(parameters, lr=lr, fused=True)


def summary_of(cls: type) -> str:
    """A class's docstring's first paragraph on one line."""
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())


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
    # Hyperparameters only the class setting uses: a task-setting run records their
    # defaults, so that they never tell task-setting runs apart (nor a default changed).
    class_setting_hparams: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hp: Hyperparameters):
        self.hp = hp

    @classmethod
    def recorded_hparams(cls, setting: str, hparams: dict) -> dict:
        """`hparams` as a run of `setting` records them: in the task setting, the
        class-setting-only ones at their defaults."""
        if setting != "task" or not cls.class_setting_hparams:
            return hparams
        defaults = cls.Hparams().model_dump()
        return {**hparams, **{name: defaults[name] for name in cls.class_setting_hparams}}

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

    def check_config(self, cfg) -> None:
        """A `UserError` where the resolved run configuration (`clbench.config.RunConfig`)
        does not suit the strategy; called before anything is built or run."""

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
        return summary_of(cls)


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


class ModuleOptions(Hyperparameters):
    """A module's typed options with their defaults; an unknown name is an error."""


@dataclass
class Variant:
    """A transformed copy of the trained network, evaluated after every task exactly like
    it, with measures of its own (e.g. `model_size_bits`) reported per task."""

    model: torch.nn.Module
    measures: dict[str, float]


class Module:
    """Something attached to any strategy's run: training-time Avalanche plugins added to
    the strategy's template (`plugins`), and evaluation-time variants of the trained
    network (`variants`). Subclasses set `name` and `Options` and override the hooks they
    need; the defaults do nothing."""

    name: ClassVar[str]
    Options: ClassVar[type[ModuleOptions]] = ModuleOptions
    # Whether training reparametrises the layers' weights (torch.nn.utils.parametrize): two
    # such modules would remove each other's parametrisations, so a run takes one at most.
    reparametrises_weights: ClassVar[bool] = False

    def __init__(self, options: ModuleOptions):
        self.options = options

    @classmethod
    def from_options(cls, values: dict) -> Module:
        """The module with `values` over its options' defaults; a one-line `UserError` for
        an unknown name or an invalid value."""
        try:
            return cls(cls.Options(**values))
        except ValidationError as error:
            known = ", ".join(cls.Options.model_fields) or "none"
            raise UserError(f"invalid options for module {cls.name!r}: {describe_validation_error(error)} "
                            f"(known: {known})") from None

    def recorded(self) -> dict[str, Any]:
        """`{name: ..., option: value, ...}` with every default filled in, as the run saves it."""
        return {"name": self.name, **self.options.model_dump()}

    def check_model(self, model: torch.nn.Module) -> None:
        """A `UserError` where the module does not fit this network; called before the
        run folder appears."""

    def plugins(self) -> list[SupervisedPlugin]:
        """Plugins trained along with the strategy's own, in every template it builds."""
        return []

    def variants(self, model: torch.nn.Module, calibration: Dataset, n_tasks: int) -> dict[str, Variant]:
        """Named variants of `model` (which must stay untouched), given the latest task's
        training data (items x, y, task label) for calibration and the scenario's number of
        tasks. Names must be unique across the run's modules."""
        return {}

    @classmethod
    def summary(cls) -> str:
        return summary_of(cls)


_MODULES: dict[str, type[Module]] = {}


def register_module(cls: type[Module]) -> type[Module]:
    if cls.name in _MODULES and _MODULES[cls.name] is not cls:
        raise ValueError(f"module name {cls.name!r} registered twice "
                         f"({_MODULES[cls.name].__module__} and {cls.__module__})")
    _MODULES[cls.name] = cls
    return cls


def load_modules() -> dict[str, type[Module]]:
    import clbench.modules as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    return dict(sorted(_MODULES.items()))


def build_modules(entries: list[str | dict[str, Any]]) -> list[Module]:
    """The run's modules from its configuration: each entry a module name, or a mapping of
    its name and options (`{name: ptq, bits: [8, 4]}`); a one-line `UserError` for an
    unknown name, an invalid option or the same module given twice alike."""
    modules, available = [], load_modules()
    for entry in entries:
        values = {"name": entry} if isinstance(entry, str) else dict(entry)
        name = values.pop("name", None)
        if name not in available:
            raise UserError(f"unknown module {name!r}; choose one of: {', '.join(available)}")
        modules.append(available[name].from_options(values))
    recorded = [module.recorded() for module in modules]
    if any(recorded.count(entry) > 1 for entry in recorded):
        raise UserError("a module is given twice with the same options")
    reparametrising = [module.name for module in modules if module.reparametrises_weights]
    if len(reparametrising) > 1:
        raise UserError(f"modules {' and '.join(reparametrising)} both reparametrise the layers' weights in training "
                        "and cannot share a run: keep one")
    return modules

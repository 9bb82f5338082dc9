"""Run configuration: defaults here, then a YAML file, then command-line overrides.

The resolved configuration is saved with every run; `clbench run --config` on that file
repeats the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clbench.errors import UserError, describe_validation_error


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scenario: str = Field("split_mnist_mini", description="scenario name (see `clbench list`)")
    strategy: str = Field("naive", description="strategy name (see `clbench list`)")
    setting: Literal["task", "class"] = Field(
        "task", description="task: task label known at test time (multi-head); class: not known (single head)")
    seed: int = Field(0, ge=0, description="seeds weights, data order and (with shuffle_classes) class order")
    epochs: int = Field(1, gt=0, description="training epochs per task")
    batch_size: int = Field(32, gt=0, description="training mini-batch size")
    eval_batch_size: int = Field(512, gt=0, description="evaluation mini-batch size")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="optimiser (ccgn and HAT use their own, see clbench list)")
    lr: float = Field(0.01, gt=0, description="learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    backbone: str | None = Field(None, description="feature extractor: small_cnn or resnet18 (default: the scenario's)")
    width: int = Field(32, gt=0, description="channels of the backbone's (first) conv layers")
    classes_per_task: int | None = Field(None, gt=0, description="classes per task (default: the scenario's)")
    cache: bool = Field(True, description="keep decoded images in an on-disk cache ($CLBENCH_CACHE, else ~/.cache/clbench)")
    shuffle_classes: bool = Field(False, description="order classes into tasks by the seed instead of by class id")
    data_root: str | None = Field(None, description="folder holding the dataset; else $CLBENCH_DATA_ROOT, else ~/.cache/clbench/data")
    results_dir: str = Field("runs", description="runs are written under this folder")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda")
    hparams: dict[str, Any] = Field(default_factory=dict, description="strategy hyperparameters")


def resolve_config(config_file: str | Path | None, overrides: dict[str, Any]) -> RunConfig:
    """Defaults < config file < overrides (None values in `overrides` are ignored)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise UserError(f"cannot read config file {config_file}: {error}") from None
        if not isinstance(values, dict):
            raise UserError(f"config file {config_file} must hold a mapping of option: value")
    hparams = {**(values.pop("hparams", None) or {}), **(overrides.pop("hparams", None) or {})}
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return RunConfig(**values, hparams=hparams)
    except ValidationError as error:
        raise UserError(f"invalid configuration: {describe_validation_error(error)}") from None


def parse_assignments(pairs: tuple[str, ...]) -> dict[str, Any]:
    """['ewc_lambda=100', 'mode=online'] -> {'ewc_lambda': 100, 'mode': 'online'} (YAML typing)."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--hp expects KEY=VALUE, got {pair!r}")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed

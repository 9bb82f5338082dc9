"""One run: build the scenario, train a strategy task after task, evaluate every task
after every task, write the results folder."""

from __future__ import annotations

import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import loss_metrics
from avalanche.logging import TensorboardLogger
from avalanche.models.utils import avalanche_forward
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from clbench import checkpoint, results
from clbench.allocator import keep_freed_memory
from clbench.config import RunConfig, resolve_config
from clbench.datasets.scenarios import Scenario, build_scenario, scenario_spec
from clbench.errors import UserError
from clbench.loading import InMemoryBatches, eval_batches
from clbench.models import CountsExecutedMacs, ModelSpec, model_size_bytes, parameter_count
from clbench.registry import (OPTIMIZER_OPTIONS, Module, Strategy, TrainingSetup, build_modules, build_optimizer,
                              get_strategy)

# clbench evaluates with its own loop: without --tensorboard, Avalanche's evaluator has no logger.
warnings.filterwarnings("ignore", message="No loggers specified")


class TrainingProgress(SupervisedPlugin):
    """A tqdm bar per training epoch (shown only on a terminal), and a count of training
    iterations whose loss was not finite (a diverged run)."""

    def __init__(self):
        super().__init__()
        self.task = 0
        self.nonfinite_losses = 0

    def before_training_epoch(self, strategy, **kwargs):
        self.bar = tqdm(total=len(strategy.dataloader), leave=False, disable=None,
                        desc=f"train task {self.task} epoch {strategy.clock.train_exp_epochs + 1}/{strategy.train_epochs}")

    def after_training_iteration(self, strategy, **kwargs):
        self.nonfinite_losses += not torch.isfinite(strategy.loss).item()
        self.bar.set_postfix(loss=f"{strategy.loss.item():.3f}", refresh=False)
        self.bar.update()

    def after_training_epoch(self, strategy, **kwargs):
        self.bar.close()


def make_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum)


def dense_macs(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    """Multiply-accumulates of one forward pass per sample, counted by PyTorch's FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        avalanche_forward(model, x, t)
    return counter.get_total_flops() / 2 / len(x)


TASK_CONFUSION = "task_confusion"  # class setting: test samples of each task (rows) by the task of their predicted class


def task_confusion_table(confusions: list[np.ndarray]) -> pd.DataFrame:
    """task_confusion.csv: after each task, how many test samples of each task were given
    a class of each task; where task inference errs, and towards which tasks."""
    return pd.DataFrame([{"after_task": step + 1, "true_task": true + 1, "predicted_task": predicted + 1, "samples": int(count)}
                         for step, matrix in enumerate(confusions) for (true, predicted), count in np.ndenumerate(matrix)])


@torch.no_grad()
def evaluate(model: torch.nn.Module, scenario: Scenario, batch_size: int, device: str) -> dict[str, np.ndarray]:
    """Per test task: accuracy and executed MACs per sample. In the class setting also
    the task-aware accuracy (the prediction restricted to the classes of the sample's own
    task) and the task-inference accuracy (the predicted class lies in the sample's task).

    A model whose cost depends on its input reports it (`CountsExecutedMacs`); for every
    other model the dense count applies."""
    model.eval()
    n_classes = scenario.n_classes
    task_of_class = torch.zeros(n_classes, dtype=torch.long, device=device)
    for task, classes in enumerate(scenario.task_classes):
        task_of_class[classes] = task
    accuracy, task_aware, task_inference, macs, confusion = [], [], [], [], []
    dense = None
    for experience, classes in zip(tqdm(scenario.benchmark.test_stream, desc="evaluate", leave=False, disable=None),
                                   scenario.task_classes):
        classes = torch.tensor(classes, device=device)
        correct = correct_task_aware = correct_task = seen = executed = 0
        predicted_tasks = torch.zeros(scenario.n_tasks, dtype=torch.long, device=device)
        for x, y, t in eval_batches(experience.dataset.eval(), batch_size):
            x, y, t = x.to(device), y.to(device), t.to(device)
            if isinstance(model, CountsExecutedMacs):
                logits, per_sample = model.forward_with_macs(x, t)
                executed += per_sample.sum().item()
            else:
                logits = avalanche_forward(model, x, t)
                dense = dense_macs(model, x[:1], t[:1]) if dense is None else dense
                executed += dense * len(y)
            predicted = logits.argmax(1)
            correct += (predicted == y).sum().item()
            seen += len(y)
            if scenario.setting == "class":
                correct_task += torch.isin(predicted, classes).sum().item()
                predicted_tasks += torch.bincount(task_of_class[predicted], minlength=scenario.n_tasks)
                # Some classifiers (iCaRL's nearest-mean) only score the classes seen so far.
                logits = torch.nn.functional.pad(logits, (0, n_classes - logits.shape[1]), value=-torch.inf)
                correct_task_aware += (classes[logits[:, classes].argmax(1)] == y).sum().item()
        accuracy.append(correct / seen)
        task_aware.append(correct_task_aware / seen)
        task_inference.append(correct_task / seen)
        macs.append(executed / seen)
        confusion.append(predicted_tasks.cpu().numpy())
    out = {"accuracy": np.array(accuracy)}
    if scenario.setting == "class":
        out["task_aware_accuracy"] = np.array(task_aware)
        out["task_inference_accuracy"] = np.array(task_inference)
        out[TASK_CONFUSION] = np.stack(confusion)
    out["executed_macs"] = np.array(macs)
    return out


MEASURES = "measures"  # a row's measures of the module variants, e.g. model_size_bits@w8a8_per_channel


def evaluate_with_variants(model: torch.nn.Module, evaluate_model, modules: list[Module], calibration,
                           n_tasks: int) -> dict:
    """`evaluate_model(model)`'s row, with every module variant's evaluation under
    '<key>@<variant>' (not its task confusion) and the variants' measures under MEASURES.
    The run's random state is left as it was, so the float results do not depend on the
    modules."""
    row, measures = evaluate_model(model), {}
    with torch.random.fork_rng(devices=[]):
        for module in modules:
            for name, variant in module.variants(model, calibration, n_tasks).items():
                if f"accuracy@{name}" in row:
                    raise UserError(f"two modules name a variant {name!r}: give them different options")
                row.update({f"{key}@{name}": values for key, values in evaluate_model(variant.model).items()
                            if key != TASK_CONFUSION})
                measures.update({f"{key}@{name}": value for key, value in variant.measures.items()})
    return {**row, MEASURES: measures}


class RunOutcome(NamedTuple):
    run_dir: Path
    trained: bool  # False: the folder already held a finished run of this configuration


class SilentEvaluation(EvaluationPlugin):
    """Avalanche's evaluation plugin with no metrics, no loggers and no callbacks. Every
    template has one; Avalanche's, even with nothing to compute, copies the experience in
    each of its eight callbacks per training iteration (about 0.1 ms per iteration here)."""

    def __init__(self):
        super().__init__(loggers=[])

    def __getattribute__(self, name: str):
        if name.startswith(("before_", "after_")):  # what Avalanche's plugin answers for any callback
            raise AttributeError(name)
        return super().__getattribute__(name)


def make_evaluator(cfg: RunConfig):
    """Avalanche's evaluation plugin for the templates: silent, or with `--tensorboard`
    logging the training loss per mini-batch and epoch through Avalanche's TensorBoard
    logger, under a folder per run."""
    if not cfg.tensorboard:
        return SilentEvaluation
    return partial(EvaluationPlugin, loss_metrics(minibatch=True, epoch=True),
                   loggers=[TensorboardLogger(tb_log_dir=Path(cfg.tensorboard) / results.run_path(cfg))])


def training_setup(cfg: RunConfig, progress: TrainingProgress, module_plugins: list[SupervisedPlugin]) -> TrainingSetup:
    """What every strategy's template is built from: the run's options, clbench's plugins
    (batches of in-memory data, the progress bar), the modules' plugins and the evaluator."""
    return TrainingSetup(make_optimizer=partial(make_optimizer, cfg), criterion=torch.nn.CrossEntropyLoss(),
                         train_mb_size=cfg.batch_size, train_epochs=cfg.epochs, eval_mb_size=cfg.eval_batch_size,
                         device=cfg.device, plugins=[InMemoryBatches(), progress, *module_plugins],
                         evaluator=make_evaluator(cfg))


def log_scalars(trainer, values: dict[str, float], step: int) -> None:
    """Values clbench measured itself, to the trainer's TensorBoard logger (if any)."""
    for logger in trainer.evaluator.loggers:
        if isinstance(logger, TensorboardLogger):
            for name, value in values.items():
                logger.log_single_metric(f"clbench/{name}", value, step)
            logger.writer.flush()


def check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {name!r} asked for, but PyTorch sees {torch.cuda.device_count()} CUDA GPU(s) "
                        "on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported; use cpu, cuda or cuda:<index>")


def build_model(strategy: Strategy, spec: ModelSpec) -> torch.nn.Module:
    try:
        return strategy.make_model(spec)
    except RuntimeError as error:  # PyTorch's allocator failing on a huge width
        if "allocate" not in str(error):
            raise
        raise UserError(f"cannot allocate the {spec.backbone} network of width {spec.width} "
                        "(not enough memory); choose a smaller --width") from None


def unused_options(strategy_cls: type[Strategy], cfg: RunConfig) -> dict[str, str]:
    """The run-level options this run does not use, each with why."""
    unused = dict.fromkeys(strategy_cls.own_options, f"strategy {cfg.strategy!r} has its own (see `clbench list`)")
    if cfg.optimizer == "adam":
        unused.setdefault("momentum", "Adam has none")
    return unused


def resolve(cfg: RunConfig) -> tuple[Strategy, RunConfig]:
    """The strategy, and the configuration with every default filled in (hyperparameters,
    backbone) and the options the run does not use set to null: what is saved with the
    run and identifies it. Giving an option the run does not use is an error."""
    strategy_cls = get_strategy(cfg.strategy)
    if cfg.setting not in strategy_cls.settings:
        hint = strategy_cls.setting_hint.get(cfg.setting)
        raise UserError(f"strategy {cfg.strategy!r} supports only the {' and '.join(strategy_cls.settings)} "
                        f"setting; got setting {cfg.setting!r}" + (f": {hint}" if hint else ""))
    unused = unused_options(strategy_cls, cfg)
    if given := [name for name in unused if name in cfg.model_fields_set and getattr(cfg, name) is not None]:
        them = "them" if len(given) > 1 else "it"
        raise UserError(f"the run does not use {', '.join(given)}: {unused[given[0]]}; leave {them} out of the "
                        f"command line, config file or sweep base (a sweep sets {them} in the grid entries of "
                        f"strategies that use {them})")
    if missing := [name for name in OPTIMIZER_OPTIONS if name not in unused and getattr(cfg, name) is None]:
        raise UserError(f"{', '.join(missing)} must be set: strategy {cfg.strategy!r} trains with the run's optimiser")
    strategy = strategy_cls.from_hparams(cfg.hparams)
    modules = build_modules(cfg.modules)
    check_device(cfg.device)
    hparams = strategy_cls.recorded_hparams(cfg.setting, strategy.hp.model_dump())
    resolved = cfg.model_copy(update={"hparams": hparams, **dict.fromkeys(unused),
                                      "modules": [module.recorded() for module in modules],
                                      "backbone": cfg.backbone or scenario_spec(cfg.scenario).backbone})
    strategy.check_config(resolved)
    return strategy, resolved


def run_scenario(cfg: RunConfig) -> Scenario:
    """The scenario a run configuration trains and tests on."""
    return build_scenario(cfg.scenario, cfg.setting, cfg.data_root, cfg.seed, cfg.shuffle_classes,
                          cfg.classes_per_task, cfg.cache)


def load_checkpointed_run(run_dir: Path) -> tuple[RunConfig, Scenario, dict]:
    """A run folder's configuration, scenario and checkpoint (after its last finished
    task), for the scripts that study a trained model: they exit with the reason where
    there is no checkpoint."""
    cfg = resolve_config(run_dir / "config.yaml", {})
    scenario = run_scenario(cfg)
    state = checkpoint.load(run_dir, scenario)
    if state is None:
        raise SystemExit(f"{run_dir} has no checkpoint: run it with --keep-checkpoints (a run still going has "
                         "one after its first task)")
    return cfg, scenario, state


def run(cfg: RunConfig, overwrite: bool = False) -> RunOutcome:
    """Train and evaluate one configuration into its run folder, checkpointing after every
    task and resuming from the checkpoint an interrupted run of it left. A folder that
    already holds a finished run of the same configuration is left as it is (unless
    `overwrite`); one of another configuration is an error. From here on the process
    keeps the memory it frees (`clbench.allocator`)."""
    strategy, cfg = resolve(cfg)
    if not overwrite and (finished := results.finished_run(cfg)):
        return RunOutcome(finished, trained=False)
    keep_freed_memory()
    scenario = run_scenario(cfg)
    RNGManager.set_random_seeds(cfg.seed)
    spec = ModelSpec(cfg.backbone, cfg.width, scenario.spec.input_shape, cfg.setting, scenario.task_classes)
    model = build_model(strategy, spec)
    modules = build_modules(cfg.modules)
    for module in modules:
        module.check_model(model)
    # The modules' training-time plugins, in every template the strategy builds.
    module_plugins = [plugin for module in modules for plugin in module.plugins()]
    # Only now, with every input checked, does a run folder appear.
    folder = results.start_run(cfg)
    started = time.time()
    evaluate_model = partial(evaluate, scenario=scenario, batch_size=cfg.eval_batch_size, device=cfg.device)
    train_stream = scenario.benchmark.train_stream

    def evaluate_all(model, task_index):
        """The model's row, with its module variants calibrated on task `task_index`'s training data."""
        if not modules:
            return evaluate_model(model)
        return evaluate_with_variants(model, evaluate_model, modules, train_stream[task_index].dataset.eval(),
                                      scenario.n_tasks)

    resumed = checkpoint.load(folder, scenario)
    # A resumed trainer has its own plugins (this progress bar too) and the generators as
    # they were; the setup is for templates built later (joint).
    progress = (next(plugin for plugin in resumed["trainer"].plugins if isinstance(plugin, TrainingProgress))
                if resumed else TrainingProgress())
    setup = training_setup(cfg, progress, module_plugins)
    if resumed:
        trainer, state = resumed["trainer"], resumed["progress"]
        print(f"resuming {folder} after task {len(state['after_each_task'])}", file=sys.stderr)
    else:
        state = {"started": started, "git_commit": results.git_commit(), "before_training": evaluate_all(model, 0),
                 "after_each_task": [], "train_times": [], "eval_times": []}
        trainer = strategy.make_trainer(model, setup)
    before_training, after_each_task = state["before_training"], state["after_each_task"]
    train_times, eval_times = state["train_times"], state["eval_times"]
    checkpoints = True
    for index in range(len(after_each_task), len(train_stream)):
        experience = train_stream[index]
        progress.task = index + 1
        start = time.perf_counter()
        if strategy.retrain_from_scratch:
            trainer = strategy.make_trainer(build_model(strategy, spec), setup)
            trainer.train(train_stream[: index + 1])
        else:
            trainer.train(experience)
        train_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        after_each_task.append(evaluate_all(trainer.model, index))
        eval_times.append(time.perf_counter() - start)
        accuracy = after_each_task[-1]["accuracy"]
        log_scalars(trainer, {"average_accuracy": accuracy[: index + 1].mean(),
                              **{f"accuracy/task_{j + 1}": a for j, a in enumerate(accuracy)}}, index + 1)
        checkpoints = checkpoints and checkpoint.save(folder, trainer, state, scenario)

    artifacts = trainer.artifacts() if hasattr(trainer, "artifacts") else {}
    if cfg.setting == "class":
        artifacts[TASK_CONFUSION] = task_confusion_table([row[TASK_CONFUSION] for row in after_each_task])
    results.write_run(
        folder, cfg, scenario,
        matrices={key: np.stack([row[key] for row in after_each_task]) for key in before_training
                  if key not in (TASK_CONFUSION, MEASURES)},
        measures=[row.get(MEASURES, {}) for row in after_each_task],
        before_training=before_training,
        costs={"train_time_s": train_times, "eval_time_s": eval_times,
               "stored_examples": strategy.stored_examples(scenario),
               "nonfinite_loss_iterations": progress.nonfinite_losses,
               "parameters": parameter_count(trainer.model), "model_size_bytes": model_size_bytes(trainer.model)},
        artifacts=artifacts,
        started=state["started"],
        commit=state.get("git_commit") or results.git_commit(),  # checkpoints before session 15 lack it
    )
    if "gate_usage" in artifacts:  # mean over classes, per layer and task's path
        for (task, layer), rate in artifacts["gate_usage"].groupby(["task", "layer"]).firing_rate.mean().items():
            log_scalars(trainer, {f"gate_usage/{layer}": rate}, task)
    if not cfg.keep_checkpoints:
        (folder / results.CHECKPOINT).unlink(missing_ok=True)
    run_dir = results.publish(folder, cfg)
    if progress.nonfinite_losses:
        warnings.warn(f"{progress.nonfinite_losses} training iterations had a non-finite loss: the run diverged "
                      f"(see nonfinite_loss_iterations in {run_dir / 'metrics.csv'})", stacklevel=2)
    return RunOutcome(run_dir, trained=True)

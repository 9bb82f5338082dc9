"""Run folders: `<results_dir>/<scenario>/<setting>/<strategy>/seed<N>/`.

Every file is written atomically (temporary file, then rename) and `COMPLETED` is
written last, so a folder without it is an interrupted run, never a finished one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import yaml

from clbench import metrics, plots
from clbench.config import RunConfig
from clbench.errors import UserError
from clbench.registry import load_modules, load_strategies

COMPLETED = "COMPLETED"
PACKAGES = ("clbench", "torch", "torchvision", "avalanche-lib", "numpy", "pandas", "matplotlib", "pydantic")


def run_path(cfg: RunConfig) -> Path:
    """`<scenario>/<setting>/<strategy>/seed<N>`: where a run goes under a results folder."""
    return Path(cfg.scenario) / cfg.setting / cfg.strategy / f"seed{cfg.seed}"


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.results_dir) / run_path(cfg)


def beside(run_dir: Path, suffix: str) -> Path:
    """A hidden sibling of a run folder (`.seed0.new`), which reports skip."""
    return run_dir.with_name(f".{run_dir.name}.{suffix}")


CHECKPOINT = "checkpoint.pt"  # see clbench.checkpoint
# Where the data, the cache and the results are, the device, whether checkpoints are kept
# and live logging do not change the results.
NOT_IDENTIFYING = ("data_root", "cache", "results_dir", "device", "keep_checkpoints", "tensorboard")


def recorded_config(saved: dict) -> dict:
    """A run's saved configuration with every field, strategy hyperparameter or module
    option added since it was recorded set to today's default: a new option's default
    must reproduce what clbench did before the option existed, so older runs still match
    new ones. A task-setting run's class-setting-only hyperparameters are today's
    defaults too (`Strategy.recorded_hparams`)."""
    hparams = saved.get("hparams")
    if isinstance(hparams, dict) and saved.get("strategy") in (strategies := load_strategies()):
        strategy = strategies[saved["strategy"]]
        saved = {**saved, "hparams": strategy.recorded_hparams(
            saved.get("setting"), {**strategy.Hparams().model_dump(), **hparams})}
    if isinstance(saved.get("modules"), list):
        modules = load_modules()
        saved = {**saved, "modules": [
            {"name": entry["name"], **modules[entry["name"]].Options().model_dump(), **entry}
            if isinstance(entry, dict) and entry.get("name") in modules else entry for entry in saved["modules"]]}
    return {**RunConfig().model_dump(), **saved}


def differing_fields(folder: Path, cfg: RunConfig) -> list[str]:
    """The fields that identify a run in which `folder`'s saved configuration and `cfg`
    differ (all of them where it has none that can be read)."""
    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        return [key for key in RunConfig.model_fields if key not in NOT_IDENTIFYING]
    saved = recorded_config(saved)
    wanted = cfg.model_dump()
    return [key for key in wanted if key not in NOT_IDENTIFYING and saved.get(key) != wanted[key]]


def finished_run(cfg: RunConfig) -> Path | None:
    """`cfg`'s run folder if it holds a finished run of the same configuration; None if it
    holds no finished run; a `UserError` if it holds one of another configuration."""
    run_dir = run_dir_of(cfg)
    if not (run_dir / COMPLETED).exists():
        return None
    differing = differing_fields(run_dir, cfg)
    if differing:
        raise UserError(f"{run_dir} holds a finished run of another configuration (differing: {', '.join(differing)}); "
                        "pass --overwrite to replace it or choose another --results-dir")
    return run_dir


def start_run(cfg: RunConfig) -> Path:
    """The folder to run in: the run folder itself or, where a finished run is being
    overwritten, a hidden folder beside it, so that the finished run stays until the new
    one completes (see `publish`). An interrupted run of the same configuration with a
    checkpoint is kept there, to be resumed; any other content is removed."""
    run_dir = run_dir_of(cfg)
    folder = beside(run_dir, "new") if (run_dir / COMPLETED).exists() else run_dir
    resumable = (folder / CHECKPOINT).exists() and not differing_fields(folder, cfg)
    try:
        if folder.exists() and not resumable:
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    except OSError as error:
        raise UserError(f"cannot write the run folder {folder} ({error.strerror or error}); "
                        "choose a writable --results-dir") from None
    return folder


def publish(folder: Path, cfg: RunConfig) -> Path:
    """The completed run in `folder` becomes `cfg`'s run folder, replacing the finished run
    there only now. Between the two renames a kill leaves the old run in `.<name>.old`."""
    run_dir = run_dir_of(cfg)
    if folder != run_dir:
        old = beside(run_dir, "old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(run_dir, old)
        os.rename(folder, run_dir)
        shutil.rmtree(old)
    return run_dir


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def accuracy_table(matrix: np.ndarray) -> pd.DataFrame:
    """Row i: after training task i; column j: task j (1-based names)."""
    tasks = [f"task_{j + 1}" for j in range(matrix.shape[1])]
    return pd.DataFrame(matrix, columns=tasks, index=pd.Index(range(1, len(matrix) + 1), name="after_task"))


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}{'+dirty' if dirty else ''}" if commit else None


def environment(cfg: RunConfig, started: float, commit: str | None, scenario) -> dict:
    """What the run ran on; `commit`, the checkout's when the run started (a run that
    takes an hour outlives commits made meanwhile; a resumed run may have continued under a
    later one)."""
    return {
        "seed": cfg.seed,
        "device": cfg.device,
        "data_source": scenario.source,
        "data_fingerprint": scenario.data_fingerprint,
        "command": sys.argv,
        "git_commit": commit,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        # The instruction set PyTorch's CPU kernels use: float sums, and with them a run's
        # numbers, can differ between machines that differ in it.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": {name: metadata.version(name) for name in PACKAGES},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def matrix_file(key: str) -> str:
    """'accuracy' -> 'accuracy_matrix.csv'; a module variant's 'accuracy@w8a8_per_channel'
    -> 'accuracy_matrix@w8a8_per_channel.csv'."""
    base, at, variant = key.partition("@")
    return f"{base}_matrix{at}{variant}.csv"


def write_run(run_dir: Path, cfg: RunConfig, scenario, matrices: dict[str, np.ndarray],
              before_training: dict[str, np.ndarray], costs: dict, artifacts: dict[str, pd.DataFrame],
              started: float, commit: str | None, measures: list[dict[str, float]] = ()) -> None:
    """The run's files. `matrices` and `before_training` hold the model's evaluation and
    each module variant's under '<key>@<variant>', whose metrics are named
    '<metric>@<variant>'; `measures` holds the variants' own measures after each task."""
    atomic_write(run_dir / "tasks.csv", lambda p: pd.DataFrame(
        [(j + 1, c, scenario.class_names[c]) for j, classes in enumerate(scenario.task_classes) for c in classes],
        columns=["task", "class", "name"]).to_csv(p, index=False))
    tables = []
    for key, matrix in matrices.items():
        atomic_write(run_dir / matrix_file(key), lambda p, m=matrix: accuracy_table(m).to_csv(p, float_format="%.6f"))
        base, at, variant = key.partition("@")
        if base != "executed_macs":
            table = metrics.tidy_metrics(matrix, before_training[key], prefix=base.removesuffix("accuracy"))
            tables.append(table.assign(metric=table.metric + at + variant))
    last = len(costs["train_time_s"])
    macs = {key: matrix for key, matrix in matrices.items() if key.partition("@")[0] == "executed_macs"}
    tables.append(pd.DataFrame(
        [(name, step + 1, None, value) for name in ("train_time_s", "eval_time_s") for step, value in enumerate(costs[name])]
        + [(key, step + 1, j + 1, matrix[step, j]) for key, matrix in macs.items() for step in range(last) for j in range(last)]
        # Per step, the mean over the tasks learned so far.
        + [(key, step + 1, None, matrix[step, : step + 1].mean()) for key, matrix in macs.items() for step in range(last)]
        + [(name, last, None, costs[name]) for name in ("stored_examples", "nonfinite_loss_iterations", "parameters", "model_size_bytes")]
        + [(name, step + 1, None, value) for step, values in enumerate(measures) for name, value in values.items()],
        columns=["metric", "step", "task", "value"]).astype({"task": "Int64"}))
    atomic_write(run_dir / "metrics.csv", lambda p: pd.concat(tables, ignore_index=True).to_csv(p, index=False))
    write_text(run_dir / "environment.json", json.dumps(environment(cfg, started, commit, scenario), indent=2))
    title = f"{cfg.strategy} on {cfg.scenario} (data {scenario.data_fingerprint}), {cfg.setting}-incremental, seed {cfg.seed}"
    atomic_write(run_dir / "accuracy_matrix.png", lambda p: plots.accuracy_heatmap(matrices["accuracy"], scenario.task_classes, title, p))
    atomic_write(run_dir / "task_accuracy.png", lambda p: plots.task_accuracy_curves(matrices["accuracy"], title, p))
    for name, frame in artifacts.items():
        atomic_write(run_dir / f"{name}.csv", lambda p, f=frame: f.to_csv(p, index=False))
        if name in plots.ARTIFACT_PLOTS:
            atomic_write(run_dir / f"{name}.png", lambda p, f=frame, n=name: plots.ARTIFACT_PLOTS[n](f, title, p))
    write_text(run_dir / COMPLETED, time.strftime("%Y-%m-%dT%H:%M:%S%z\n"))


# Runs that differ only in their seed: alike in every field of the resolved configuration
# that identifies a run, and in the data their scenario read (environment.json's data
# fingerprint, "unknown" where an older run did not record it).
RUN_KEYS = ["scenario", "data", "setting", "strategy"] + [
    name for name in RunConfig.model_fields if name not in (*NOT_IDENTIFYING, "scenario", "setting", "strategy", "seed")]


def key_text(value) -> str:
    """A recorded configuration value as runs are grouped by it and tables show it."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
    return "none" if value is None else str(value)


class DamagedRun(Exception):
    """A finished run folder whose files cannot be read as a run's."""


def read_run(run_dir: Path) -> pd.DataFrame:
    """A finished run's metrics.csv with its keys, seed and folder; `DamagedRun` if its
    configuration (its scenario, setting, strategy and seed at least), metrics or accuracy
    matrix are missing or malformed."""
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        environment = run_dir / "environment.json"
        data = json.loads(environment.read_text()).get("data_fingerprint") if environment.exists() else None
        recorded = recorded_config(cfg)
        keys = {key: key_text(recorded[key]) for key in RUN_KEYS if key != "data"}
        keys.update({key: cfg[key] for key in ("scenario", "setting", "strategy", "seed")}, data=data or "unknown")
        table = pd.read_csv(run_dir / "metrics.csv")
        matrix = pd.read_csv(run_dir / "accuracy_matrix.csv", index_col="after_task").to_numpy(dtype=float)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, pd.errors.ParserError, pd.errors.EmptyDataError,
            KeyError, TypeError, AttributeError, ValueError) as error:
        raise DamagedRun(f"{type(error).__name__}: {' '.join(str(error).split())}") from None
    if list(table.columns) != ["metric", "step", "task", "value"]:
        raise DamagedRun("metrics.csv does not have the columns metric, step, task, value")
    if matrix.size == 0 or matrix.shape[0] != matrix.shape[1] or not ((matrix >= 0) & (matrix <= 1)).all():
        raise DamagedRun(f"accuracy_matrix.csv is not a square matrix of accuracies in [0, 1] (shape {matrix.shape})")
    return table.assign(**keys, run_dir=str(run_dir))


def load_metrics(*roots: str | Path) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """Every metric of every finished run under the `roots` as one long table (the run's
    keys, seed and folder, then metric, step, task, value), and the run folders left out,
    each with why: not finished, or damaged. Hidden folders (a run being overwritten) are
    skipped."""
    frames, left_out = [], []
    for root in map(Path, roots):
        for config_path in sorted(root.rglob("config.yaml")):
            run_dir = config_path.parent
            if any(part.startswith(".") for part in run_dir.relative_to(root).parts):
                continue
            if not (run_dir / COMPLETED).exists():
                left_out.append((run_dir, "not finished"))
                continue
            try:
                frames.append(read_run(run_dir))
            except DamagedRun as error:
                left_out.append((run_dir, f"damaged: {error}"))
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), left_out


def load_finished_runs(*roots: str | Path) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """Final-step metrics of every finished run under the `roots` (see `final_metrics`),
    and the run folders left out (see `load_metrics`)."""
    metrics, left_out = load_metrics(*roots)
    return final_metrics(metrics), left_out


def final_metrics(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per run of a `load_metrics` table: its keys and final-step metrics (times
    summed over steps)."""
    if metrics.empty:
        return metrics
    index = RUN_KEYS + ["seed", "run_dir"]
    final = metrics[metrics.task.isna() & (metrics.step == metrics.groupby("run_dir").step.transform("max"))]
    runs = final.pivot_table(index=index, columns="metric", values="value", aggfunc="first")
    times = metrics[metrics.metric.isin(["train_time_s", "eval_time_s"])]
    runs.update(times.pivot_table(index=index, columns="metric", values="value", aggfunc="sum"))
    runs.columns.name = None
    return runs.reset_index()


SUMMARY_METRICS = ("average_accuracy", "average_forgetting", "backward_transfer", "forward_transfer",
                   "task_aware_average_accuracy", "task_inference_average_accuracy", "executed_macs",
                   "stored_examples", "parameters", "model_size_bytes", "train_time_s", "nonfinite_loss_iterations")
# Of every module variant ('<metric>@<variant>'), after these in summaries.
VARIANT_SUMMARY_METRICS = ("average_accuracy", "average_forgetting", "model_size_bits", "sparsity")


def varying(frame: pd.DataFrame, key: str) -> pd.Series:
    """True where other rows of the same scenario, setting and strategy differ in `key`:
    what tells them apart."""
    return frame.groupby(["scenario", "setting", "strategy"])[key].transform("nunique") > 1


def distinguishing(frame: pd.DataFrame, key: str) -> pd.Series:
    """What tells each row apart from other rows of its scenario, setting and strategy in
    `key`: its value where they differ in it, blank where not; for `hparams` only the
    hyperparameters that differ, as 'name=value, ...'."""
    if key != "hparams":
        return frame[key].where(varying(frame, key), "")
    parsed = frame.hparams.map(lambda text: dict(item.split("=", 1) for item in text.split(", ")) if text else {})
    shown = pd.Series("", index=frame.index)
    for _, group in frame.groupby(["scenario", "setting", "strategy"]):
        values = parsed[group.index]
        names = sorted({name for hparams in values for name in hparams})
        differ = [name for name in names if len({hparams.get(name) for hparams in values}) > 1]
        shown[group.index] = [", ".join(f"{name}={hparams.get(name)}" for name in differ) for hparams in values]
    return shown


def with_labels(metrics: pd.DataFrame) -> pd.DataFrame:
    """Adds each configuration's name in figures: the strategy, with the keys in which
    runs of it differ (the figures' titles name scenario, data and setting)."""
    parts = [(text if key == "hparams" else (f"{key}=" + text).where(text != "", ""))
             for key in RUN_KEYS[4:] for text in [distinguishing(metrics, key)]]
    details = pd.concat(parts, axis=1).agg(lambda row: "; ".join(filter(None, row)), axis=1)
    named = metrics.strategy + " (" + details + ")"
    return metrics.assign(label=named.where(details != "", metrics.strategy))


def run_tables(metrics: pd.DataFrame, name: str) -> pd.DataFrame:
    """A per-run table saved by a strategy (e.g. kernel_usage.csv) for every run of a
    labelled `load_metrics` table that has it, with the run's keys."""
    frames = [pd.read_csv(Path(row.run_dir) / f"{name}.csv").assign(
                  run_dir=row.run_dir, strategy=row.strategy, scenario=row.scenario, data=row.data,
                  setting=row.setting, label=row.label)
              for row in metrics.drop_duplicates("run_dir").itertuples()
              if (Path(row.run_dir) / f"{name}.csv").exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summarise_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of every configuration (runs that differ
    only in their seed), with the number of runs."""
    present = [m for m in SUMMARY_METRICS if m in runs] + sorted(
        (m for m in runs if m.partition("@")[0] in VARIANT_SUMMARY_METRICS and "@" in m),
        key=lambda m: (m.partition("@")[2], VARIANT_SUMMARY_METRICS.index(m.partition("@")[0])))
    grouped = runs.groupby(RUN_KEYS, sort=True)
    summary = grouped[present].agg(["mean", "std"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary.insert(0, "runs", grouped.size())
    return summary.reset_index()

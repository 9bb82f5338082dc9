"""`clbench sweep FILE`: many runs from one YAML file, on a pool of worker processes.

A sweep file has `base`, options shared by every run (any key of `clbench run`'s config,
`hparams` included, and `config`, a run config file such as a protocol preset whose
options come first), and `grid`, one mapping or a list of them: in each, with `base`
under it, a list value is swept over, and every combination is one run. For example

    base: {scenario: split_mnist, data_root: ../shared/data, results_dir: results/split_mnist}
    grid:
      - {setting: task, strategy: [naive, ewc], seed: [0, 1, 2]}
      - {setting: class, strategy: [naive, icarl], seed: [0, 1, 2], hparams: {memory_size: [200, 500]}}

Every run is resolved (defaults filled in, names and values checked) before anything
trains, and named by a stable id, a hash of its resolved configuration. Runs already
finished are skipped, so the same command after a crash or a kill finishes only what is
missing. A run that fails leaves its traceback in `error.txt` in its folder and the
others go on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from tqdm.auto import tqdm

from clbench import results
from clbench.config import RunConfig, read_yaml, resolve_config
from clbench.errors import UserError

SWEEP_KEYS = {"base", "grid"}
LOG = "run.log"
ERROR = "error.txt"


@dataclass(frozen=True)
class PlannedRun:
    id: str
    cfg: RunConfig  # resolved
    status: str  # see `status`

    @property
    def run_dir(self) -> Path:
        return results.run_dir_of(self.cfg)


def run_id(cfg: RunConfig) -> str:
    """A stable name for a resolved configuration: the hash of the fields that identify it."""
    identity = {key: value for key, value in cfg.model_dump().items() if key not in results.NOT_IDENTIFYING}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def combinations(entry: dict) -> list[dict]:
    """Every combination of the list values of `entry` (and of its `hparams`, a mapping)."""
    flat = {**{key: value for key, value in entry.items() if key != "hparams"},
            **{("hparams", key): value for key, value in (entry.get("hparams") or {}).items()}}
    choices = [value if isinstance(value, list) else [value] for value in flat.values()]
    expanded = []
    for values in itertools.product(*choices):
        combination = {"hparams": {}}
        for key, value in zip(flat, values):
            if isinstance(key, tuple):
                combination["hparams"][key[1]] = value
            else:
                combination[key] = value
        expanded.append(combination)
    return expanded


def expand(sweep: dict) -> list[RunConfig]:
    """The sweep's runs, in file order, as run configurations (not resolved yet)."""
    if not isinstance(sweep, dict) or set(sweep) - SWEEP_KEYS or "grid" not in sweep:
        keys = ", ".join(sorted(set(sweep) - SWEEP_KEYS)) if isinstance(sweep, dict) else "not a mapping"
        raise UserError(f"a sweep file holds 'base' (optional) and 'grid' (a mapping or a list of them); got: {keys}")
    base = sweep.get("base") or {}
    grid = sweep["grid"] if isinstance(sweep["grid"], list) else [sweep["grid"]]
    if not isinstance(base, dict) or not all(isinstance(entry, dict) for entry in grid):
        raise UserError("a sweep's base and each entry of its grid must be mappings of option: value")
    base = dict(base)
    preset = base.pop("config", None)
    if not all(isinstance(part.get("hparams") or {}, dict) for part in (base, *grid)):
        raise UserError("a sweep's hparams must be a mapping of name: value or list of values")
    configs = []
    for entry in grid:
        merged = {**base, **entry, "hparams": {**(base.get("hparams") or {}), **(entry.get("hparams") or {})}}
        for combination in combinations(merged):
            try:
                configs.append(resolve_config(preset, combination))
            except UserError as error:
                raise UserError(f"invalid run in the sweep ({combination}): {error}") from None
    return configs


def plan(path: str | Path) -> list[PlannedRun]:
    """The sweep file's runs, resolved and checked, each with its status."""
    from clbench.runner import resolve

    folders = {}  # run folder -> configuration; a run listed twice is run once
    for cfg in expand(read_yaml(path, "sweep file")):
        _, cfg = resolve(cfg)
        run_dir = results.run_dir_of(cfg)
        if folders.setdefault(run_dir, cfg) != cfg:
            raise UserError(f"two runs of the sweep would write the same folder {run_dir}: give them different "
                            "results_dir values")
    return [PlannedRun(run_id(cfg), cfg, status(cfg)) for cfg in folders.values()]


def status(cfg: RunConfig) -> str:
    """done; other (its folder holds a finished run of another configuration); partial (a
    folder without COMPLETED); or missing."""
    run_dir = results.run_dir_of(cfg)
    if (run_dir / results.COMPLETED).exists():
        return "other" if results.differing_fields(run_dir, cfg) else "done"
    return "partial" if run_dir.exists() else "missing"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def execute(cfg: RunConfig, threads: int) -> tuple[str | None, float]:
    """One run in a worker with `threads` PyTorch threads, its output in `run.log` of its
    folder; the error (one line) if it failed, with the traceback in `error.txt`."""
    import torch

    from clbench.runner import run

    torch.set_num_threads(threads)
    started = time.perf_counter()
    run_dir = results.run_dir_of(cfg)
    log = results.beside(run_dir, "log")  # outside the folder, which the run may replace
    log.parent.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR).unlink(missing_ok=True)
    error = None
    with open(log, "w") as stream, redirect_stdout(stream), redirect_stderr(stream):
        try:
            run(cfg)
        except Exception as failure:  # noqa: BLE001 - recorded, and the sweep goes on
            error = f"{type(failure).__name__}: {' '.join(str(failure).split())}"
            traceback.print_exc(file=stream)
    run_dir.mkdir(parents=True, exist_ok=True)
    os.replace(log, run_dir / LOG)
    if error:
        results.write_text(run_dir / ERROR, (run_dir / LOG).read_text())
    return error, time.perf_counter() - started


def on_local_processes(todo: list[PlannedRun], workers: int, threads: int):
    """(run, error, seconds) as each run finishes on a pool of `workers` processes."""
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(execute, run.cfg, threads): run for run in todo}
        for future in as_completed(futures):
            yield futures[future], *future.result()


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """`cfg` with its folders made absolute: Ray workers do not share the caller's
    working directory."""
    return cfg.model_copy(update={"results_dir": os.path.abspath(cfg.results_dir),
                                  "data_root": cfg.data_root and os.path.abspath(cfg.data_root)})


def on_ray(todo: list[PlannedRun], workers: int, threads: int, address: str | None):
    """(run, error, seconds) as each run finishes as a Ray task of `threads` CPUs, on the
    cluster at `address`, or on a local Ray instance of workers x threads CPUs."""
    try:
        import ray
    except ImportError:
        raise UserError("the Ray executor needs Ray: pip install -e '.[ray]'") from None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=workers * threads, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=threads, max_retries=0)(execute)
        runs = {remote.remote(absolute_paths(run.cfg), threads): run for run in todo}
        pending = list(runs)
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            yield runs[finished[0]], *ray.get(finished[0])
    finally:
        ray.shutdown()


def run_sweep(planned: list[PlannedRun], workers: int, executor: str = "local",
              address: str | None = None) -> list[tuple[PlannedRun, str]]:
    """Run every planned run not done yet, `workers` at a time on local processes or as
    Ray tasks; returns the failures. Each run gets cores // workers threads, however few
    runs remain, so that a resumed sweep computes exactly as an uninterrupted one. Nothing
    runs where a run's folder holds a finished run of another configuration."""
    if other := [run for run in planned if run.status == "other"]:
        differing = ", ".join(results.differing_fields(other[0].run_dir, other[0].cfg))
        raise UserError(f"{len(other)} run folders hold a finished run of another configuration (first: "
                        f"{other[0].run_dir}, differing: {differing}); remove them or give the sweep another "
                        "results_dir (--dry-run lists them)")
    todo = [run for run in planned if run.status != "done"]
    threads = max(1, available_cores() // workers)
    workers = min(workers, len(todo))
    finished = (on_ray(todo, workers, threads, address) if executor == "ray"
                else on_local_processes(todo, workers, threads))
    failures = []
    with tqdm(total=len(todo), desc="sweep", unit="run", disable=None) as bar:
        for run, error, seconds in finished:
            if error:
                failures.append((run, error))
            bar.update()
            bar.set_postfix(failed=len(failures), refresh=False)
            bar.write(f"{'failed' if error else 'done'} ({seconds:.0f} s): {run.run_dir}"
                      + (f": {error}" if error else ""))
    return failures

"""Command line: `clbench run`, `clbench sweep`, `clbench list`, `clbench table`, `clbench report`.

`main(argv)` is the entry point tests call; it returns the exit code (2 for bad input,
with a one-line message and no traceback).
"""

from __future__ import annotations

import sys
import types
import typing

import click

from clbench.config import RunConfig, parse_assignments, parse_module, resolve_config
from clbench.errors import UserError


def config_options(command):
    """One option per RunConfig field (except hparams), typed and documented from the model."""
    for name, field in reversed(RunConfig.model_fields.items()):
        if name in ("hparams", "modules"):
            continue
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
            annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
        help_text = f"{field.description or name} [default: {field.default}]"
        if annotation is bool:
            command = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)(command)
            continue
        if typing.get_origin(annotation) is typing.Literal:
            kind = click.Choice(typing.get_args(annotation))
        else:
            kind = {int: int, float: float}.get(annotation, str)
        command = click.option(flag, name, type=kind, default=None, help=help_text)(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """clbench: continual-learning benchmarks (scenarios, strategies, metrics, results)."""


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML file of run options (keys as below, with '_'); command-line options override it")
@config_options
@click.option("--hp", "hparams", multiple=True, metavar="KEY=VALUE",
              help="strategy hyperparameter, repeatable (see `clbench list`); unknown keys are errors")
@click.option("--module", "modules", multiple=True, metavar="NAME[:KEY=VALUE,...]",
              help="attach a module with its options (e.g. ptq:bits=[8,4],dfq=true), repeatable; replaces the "
                   "config file's modules (see `clbench list`)")
@click.option("--overwrite", is_flag=True, help="run again even where the run folder holds a finished run")
def run(config_file, hparams, modules, overwrite, **options):
    """Train a strategy task after task on a scenario and write its results folder. A
    folder that holds a finished run of the same configuration is left as it is."""
    from clbench.runner import run as run_experiment  # imports torch and Avalanche: only when needed

    cfg = resolve_config(config_file, {**options, "hparams": parse_assignments(hparams),
                                       "modules": [parse_module(text) for text in modules] or None})
    run_dir, trained = run_experiment(cfg, overwrite=overwrite)
    if trained:
        click.echo(f"finished: {run_dir}")
    else:
        click.echo(f"already finished with this configuration, not run again: {run_dir} "
                   "(--overwrite runs it again)")


@cli.command()
@click.argument("sweep_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="worker processes, each with its share of the cores [default: the cores available]")
@click.option("--dry-run", is_flag=True,
              help="list the runs and whether each is done, partial or missing; run nothing")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
              help="local worker processes, or Ray tasks (pip install -e '.[ray]') [default: local]")
@click.option("--address", default=None,
              help="with --executor ray: the Ray cluster to join [default: a local Ray instance]")
def sweep(sweep_file, workers, dry_run, executor, address):
    """Run every run of SWEEP_FILE (YAML: `base` options and a `grid` of lists to sweep
    over) that is not finished yet; see README, "Sweeps"."""
    from clbench.sweep import available_cores, plan, run_sweep

    if address and executor != "ray":
        raise UserError("--address names a Ray cluster: use it with --executor ray")
    planned = plan(sweep_file)
    if dry_run:
        for run in planned:
            click.echo(f"{run.status:<8} {run.id}  {run.run_dir}")
    counts = {status: sum(run.status == status for run in planned) for status in ("done", "other", "partial", "missing")}
    click.echo(f"{len(planned)} runs: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    if dry_run or counts["done"] == len(planned):
        return
    failures = run_sweep(planned, workers or available_cores(), executor, address)
    click.echo(f"sweep finished: {len(planned) - len(failures)} of {len(planned)} runs done, {len(failures)} failed")
    for run, error in failures:
        click.echo(f"failed: {run.run_dir} ({error}; traceback in error.txt there)", err=True)
    if failures:
        raise click.exceptions.Exit(1)


@cli.command(name="list")
def list_command():
    """Show the registered strategies (settings, hyperparameters), modules (options) and scenarios."""
    from clbench.datasets.scenarios import SCENARIOS
    from clbench.registry import load_modules, load_strategies

    click.echo("Strategies:")
    for name, strategy in load_strategies().items():
        click.echo(f"  {name:<8} [{', '.join(strategy.settings)}] {strategy.summary()}")
        echo_fields(strategy.Hparams)
    click.echo("Modules (--module NAME:KEY=VALUE,...):")
    for name, module in load_modules().items():
        click.echo(f"  {name:<8} {module.summary()}")
        echo_fields(module.Options)
    click.echo("Scenarios:")
    for spec in SCENARIOS.values():
        shape = "x".join(map(str, spec.input_shape))
        size = f"{spec.n_classes // spec.classes_per_task} tasks, {spec.n_classes} classes" if spec.n_classes else "any classes"
        click.echo(f"  {spec.name:<18} {size}, input {shape}, backbone {spec.backbone}: {spec.description}")


def type_text(annotation) -> str:
    """int; a|b for a Literal or a union (float|None); list[a|b] for a list."""
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return f"list[{type_text(typing.get_args(annotation)[0])}]"
    if isinstance(annotation, types.UnionType):
        return "|".join(type_text(arg) for arg in typing.get_args(annotation))
    return "None" if annotation is type(None) else annotation.__name__


def echo_fields(options) -> None:
    for name, field in options.model_fields.items():
        click.echo(f"      {name}: {type_text(field.annotation)} = {field.get_default(call_default_factory=True)!r}  "
                   f"{field.description or ''}")


@cli.command()
@click.argument("results_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--output", type=click.Path(dir_okay=False), help="also write the Markdown table to this file")
def table(results_dirs, output):
    """Final metrics of the finished runs under RESULTS_DIRS (one or more folders), mean ±
    std over seeds, as a Markdown table (unfinished and damaged runs are left out and
    listed)."""
    from clbench.report import summary_table
    from clbench.results import load_finished_runs, summarise_runs

    runs, left_out = load_finished_runs(*results_dirs)
    if runs.empty:
        raise UserError(f"no finished runs under {', '.join(results_dirs)}")
    text = summary_table(summarise_runs(runs)).to_markdown(index=False, disable_numparse=True)
    click.echo(text)
    echo_left_out(left_out)
    if output:
        with open(output, "w") as handle:
            handle.write(text + "\n")


@cli.command()
@click.argument("results_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--output", type=click.Path(file_okay=False),
              help="folder for the report [default: the first RESULTS_DIRS/report]")
@click.option("--compare", "compare_with", type=click.Path(exists=True, file_okay=False),
              help="another results folder (e.g. before a change): adds the differences RESULTS_DIRS minus it")
def report(results_dirs, output, compare_with):
    """Tables (CSV, Markdown, LaTeX), figures (PNG, PDF) and one self-contained HTML page
    of the finished runs under RESULTS_DIRS (one or more folders), mean ± std over seeds."""
    from pathlib import Path

    from clbench.report import write_report

    page, left_out = write_report(list(results_dirs), Path(output or Path(results_dirs[0]) / "report"), compare_with)
    echo_left_out(left_out)
    click.echo(f"report: {page}")


def echo_left_out(left_out) -> None:
    for run_dir, why in left_out:
        click.echo(f"left out ({why}): {run_dir}", err=True)


def main(argv: list[str] | None = None) -> int:
    try:
        # Without standalone mode, click returns the code of a `click.exceptions.Exit`.
        code = cli.main(args=argv, prog_name="clbench", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 1
    except UserError as error:
        click.echo(f"clbench: error: {' '.join(str(error).split())}", err=True)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())

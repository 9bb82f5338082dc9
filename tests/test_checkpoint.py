"""Checkpoints after every task: a run killed part-way resumes from its last finished
task and ends with the same results as a run never killed."""

import subprocess
import sys
import time

import pytest
from conftest import TINY_CLI

from clbench.config import RunConfig
from clbench.results import CHECKPOINT
from clbench.runner import run


def kill_after_tasks(command: list[str], folder, tasks: int) -> None:
    """Start `command` and kill it once it has written its checkpoint `tasks` times."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = set()
    while len(seen) < tasks and process.poll() is None:
        try:
            seen.add((folder / CHECKPOINT).stat().st_mtime_ns)
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert len(seen) == tasks, "the run finished before it could be killed"


@pytest.mark.slow
@pytest.mark.parametrize("strategy,setting", [("naive", "task"), ("ewc", "task"), ("lwf", "task"),
                                              ("replay", "class"), ("ccgn", "class"), ("hat", "task")])
def test_a_run_killed_after_task_3_resumes_and_ends_as_if_never_killed(strategy, setting, tiny_scenario, tmp_path,
                                                                         capsys):
    config = RunConfig(scenario=tiny_scenario, strategy=strategy, setting=setting)
    reference = run(config.model_copy(update={"results_dir": str(tmp_path / "a")})).run_dir
    command = [sys.executable, "-c", TINY_CLI, "run", "--scenario", tiny_scenario, "--strategy", strategy,
               "--setting", setting, "--results-dir", str(tmp_path / "b")]
    folder = tmp_path / "b" / tiny_scenario / setting / strategy / "seed0"
    kill_after_tasks(command, folder, tasks=3)
    assert not (folder / "COMPLETED").exists()
    capsys.readouterr()
    assert run(config.model_copy(update={"results_dir": str(tmp_path / "b")})).run_dir == folder
    assert "after task 3" in capsys.readouterr().err
    for name in ("accuracy_matrix.csv", "executed_macs_matrix.csv"):
        assert (folder / name).read_text() == (reference / name).read_text()
    assert not (folder / CHECKPOINT).exists()  # removed once the run completed


def test_a_checkpoint_refers_to_the_scenarios_data_instead_of_copying_it(tmp_path, capsys):
    """... and loads without printing (scripts print their tables on stdout)."""
    from clbench import checkpoint
    from clbench.runner import run_scenario

    config = RunConfig(strategy="replay", setting="class", width=4, batch_size=128, classes_per_task=5,
                       keep_checkpoints=True, results_dir=str(tmp_path))
    folder = run(config).run_dir
    train_images = 10_000 * 28 * 28 * 4  # split_mnist_mini's training set as float32, which the memory views
    assert (folder / CHECKPOINT).stat().st_size < train_images / 10
    scenario = run_scenario(config)
    capsys.readouterr()
    assert checkpoint.load(folder, scenario) is not None
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("mode", ["online", "separate"])
def test_the_ewc_importance_script_reports_the_importances_the_penalty_weighs(mode, tiny_scenario, tmp_path, capsys):
    """Per parameter, the largest importance the next task's penalty weighs (separate mode:
    the tasks' importances summed; online: the latest, a decayed sum), the largest first;
    the weights past the limit are those with lr * 2 * lambda * F above 2 (1 + momentum)."""
    from conftest import load_script

    from clbench import checkpoint
    from clbench.runner import run_scenario

    script = load_script("scripts", "ewc_importances")
    cfg = RunConfig(scenario=tiny_scenario, strategy="ewc", hparams={"ewc_lambda": 1e4, "mode": mode}, width=4,
                    classes_per_task=5, results_dir=str(tmp_path), keep_checkpoints=True)
    run_dir = run(cfg).run_dir
    capsys.readouterr()
    script.main([str(run_dir), "--top", "1000"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("|") for line in lines if line.startswith("| ") and not line.startswith("| parameter")]
    above = next(line for line in lines if line.startswith("weights above"))
    plugin = next(p for p in checkpoint.load(run_dir, run_scenario(cfg))["trainer"].plugins
                  if hasattr(p, "importances"))
    weighed = {}
    for task in sorted(plugin.importances) if mode == "separate" else [max(plugin.importances)]:
        for name, imp in plugin.importances[task].items():
            weighed[name] = weighed.get(name, 0) + imp.data
    assert len(plugin.importances) == (2 if mode == "separate" else 1)
    assert {cells[1].strip(): float(cells[3]) for cells in rows} == pytest.approx(
        {name: f.max().item() for name, f in weighed.items()}, rel=1e-2)
    assert float(rows[0][3]) == max(float(cells[3]) for cells in rows)
    limit = 2 * (1 + cfg.momentum) / (2 * cfg.lr * 1e4)
    past = sum(int((f > limit).sum()) for f in weighed.values())
    assert past > 0 and int(above.split()[-3]) == past

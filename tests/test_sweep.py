"""`clbench sweep`: expansion into runs with stable ids, bad sweep files, statuses,
failure isolation, and a sweep killed at a random moment that finishes as if it never
was."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from clbench.cli import main
from clbench.config import RunConfig
from clbench.results import load_finished_runs
from clbench.sweep import combinations, expand, plan, run_id

QUICK = {"scenario": "split_mnist_mini", "batch_size": 128, "classes_per_task": 5}  # 2 tasks, seconds per run


def write_sweep(path, results_dir, grid) -> str:
    path.write_text(yaml.safe_dump({"base": {**QUICK, "results_dir": str(results_dir)}, "grid": grid}))
    return str(path)


def test_grid_entries_expand_into_every_combination_in_file_order():
    entry = {"strategy": ["naive", "ewc"], "seed": [0, 1], "hparams": {"ewc_lambda": [1, 2]}, "setting": "task"}
    runs = combinations(entry)
    assert len(runs) == 8
    assert runs[0] == {"strategy": "naive", "seed": 0, "setting": "task", "hparams": {"ewc_lambda": 1}}
    configs = expand({"base": {"epochs": 3, "hparams": {"mode": "separate"}},
                      "grid": [{"strategy": "ewc", "seed": [0, 1]}, {"strategy": "naive"}]})
    assert [(c.strategy, c.seed, c.epochs) for c in configs] == [("ewc", 0, 3), ("ewc", 1, 3), ("naive", 0, 3)]
    assert configs[0].hparams == {"mode": "separate"}
    # A list in base is swept in every entry, unless the entry sets that option itself.
    configs = expand({"base": {"seed": [0, 1], "hparams": {"ewc_lambda": [1, 2]}},
                      "grid": [{"strategy": "ewc"}, {"strategy": "ewc", "seed": 5, "hparams": {"ewc_lambda": 3}}]})
    assert [(c.seed, c.hparams["ewc_lambda"]) for c in configs] == [(0, 1), (0, 2), (1, 1), (1, 2), (5, 3)]


def test_a_preset_named_in_base_comes_first_and_base_and_grid_override_it(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("epochs: 3\nbatch_size: 64\nwidth: 8\nhparams: {mode: separate, ewc_lambda: 5}\n")
    configs = expand({"base": {"config": str(preset), "width": 16, "hparams": {"ewc_lambda": 7}},
                      "grid": [{"strategy": "ewc", "batch_size": [32, 64]}]})
    assert [(c.epochs, c.batch_size, c.width) for c in configs] == [(3, 32, 16), (3, 64, 16)]
    assert configs[0].hparams == {"mode": "separate", "ewc_lambda": 7}
    paper = Path(__file__).parents[1] / "configs" / "paper" / "split_mnist.yaml"
    assert expand({"base": {"config": str(paper)}, "grid": {"strategy": "ccgn"}})[0].epochs == 3


def test_run_ids_name_the_configuration_not_where_it_is_written():
    a = RunConfig(strategy="ewc", hparams={"ewc_lambda": 1.0})
    elsewhere = {"results_dir": "elsewhere", "data_root": "/data", "device": "cuda"}
    assert run_id(a) == run_id(a.model_copy(update=elsewhere))
    assert run_id(a) != run_id(a.model_copy(update={"hparams": {"ewc_lambda": 2.0}}))
    assert run_id(a) != run_id(a.model_copy(update={"seed": 1}))


@pytest.mark.parametrize("sweep,message", [
    ({"grid": {"strategy": "naive"}, "runs": []}, "got: runs"),
    ({"base": {"strategy": "naive"}}, "'grid'"),
    ({"grid": {"stratgy": "naive"}}, "stratgy: Extra inputs are not permitted"),
    ({"grid": {"strategy": ["naive", "nope"]}}, "unknown strategy 'nope'"),
    ({"grid": {"strategy": "ewc", "hparams": {"ewc_lambda": [1, 2]}}}, "would write the same folder"),
    ({"grid": {"lr": "inf"}}, "lr: Input should be a finite number"),
    ({"grid": {"strategy": "ewc", "hparams": [1]}}, "hparams must be a mapping"),
    ({"base": {"hparams": "ewc_lambda=1"}, "grid": {"strategy": "ewc"}}, "hparams must be a mapping"),
    ({"base": {"lr": 0.1}, "grid": {"strategy": ["naive", "ccgn"]}}, "does not use lr: strategy 'ccgn' has its own"),
])
def test_a_bad_sweep_file_is_one_line_and_exit_code_2_before_anything_runs(sweep, message, tmp_path, capsys):
    sweep = {**sweep, "base": {**sweep.get("base", {}), "results_dir": str(tmp_path / "runs")}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(tmp_path / "sweep.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_a_folder_holding_another_configurations_run_is_listed_and_nothing_runs(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep.yaml", tmp_path / "out", [{"strategy": "naive"}])
    [planned] = plan(sweep)
    planned.run_dir.mkdir(parents=True)
    (planned.run_dir / "config.yaml").write_text(yaml.safe_dump({**planned.cfg.model_dump(), "epochs": 2}))
    (planned.run_dir / "COMPLETED").write_text("")
    assert main(["sweep", sweep, "--dry-run"]) == 0
    assert "1 runs: 0 done, 1 other, 0 partial, 0 missing" in capsys.readouterr().out
    assert main(["sweep", sweep]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "differing: epochs" in err
    assert sorted(p.name for p in planned.run_dir.iterdir()) == ["COMPLETED", "config.yaml"]


def test_a_run_recorded_before_an_option_existed_is_done_if_the_option_has_its_default(tmp_path):
    sweep = write_sweep(tmp_path / "sweep.yaml", tmp_path / "out", [{"strategy": "ewc"}])
    [planned] = plan(sweep)
    older = planned.cfg.model_dump()
    del older["shuffle_classes"], older["hparams"]["decay_factor"]  # as if both were added since
    planned.run_dir.mkdir(parents=True)
    (planned.run_dir / "config.yaml").write_text(yaml.safe_dump(older))
    (planned.run_dir / "COMPLETED").write_text("")
    assert [run.status for run in plan(sweep)] == ["done"]
    older["hparams"]["mode"] = "separate"
    (planned.run_dir / "config.yaml").write_text(yaml.safe_dump(older))
    assert [run.status for run in plan(sweep)] == ["other"]


def test_a_failing_run_is_recorded_and_the_others_finish(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep.yaml", tmp_path / "out", [
        {"strategy": "naive"},
        {"scenario": "image_folder", "data_root": str(tmp_path / "missing"), "strategy": "naive"}])
    assert main(["sweep", sweep, "--dry-run"]) == 0
    assert "2 runs: 0 done, 0 other, 0 partial, 2 missing" in capsys.readouterr().out
    assert main(["sweep", sweep, "--workers", "2"]) == 1
    out, err = capsys.readouterr()
    assert "1 of 2 runs done, 1 failed" in out and "image folder" in err
    failed = tmp_path / "out" / "image_folder" / "task" / "naive" / "seed0"
    assert "Traceback" in (failed / "error.txt").read_text() and not (failed / "COMPLETED").exists()
    assert (tmp_path / "out" / "split_mnist_mini" / "task" / "naive" / "seed0" / "run.log").exists()
    assert [run.status for run in plan(sweep)] == ["done", "partial"]


def accuracy_matrices(root) -> dict:
    return {str(path.relative_to(root)): path.read_text() for path in sorted(root.rglob("accuracy_matrix.csv"))}


@pytest.mark.slow
def test_a_sweep_killed_at_a_random_moment_finishes_as_if_never_killed(tmp_path):
    grid = [{"setting": "task", "strategy": ["naive", "l2"], "seed": [0, 1]},
            {"setting": "class", "strategy": "naive", "seed": 0}]
    command = [sys.executable, "-m", "clbench.cli", "sweep"]
    reference = write_sweep(tmp_path / "reference.yaml", tmp_path / "reference", grid)
    subprocess.run(command + [reference, "--workers", "2"], check=True, capture_output=True)

    killed = write_sweep(tmp_path / "killed.yaml", tmp_path / "killed", grid)
    process = subprocess.Popen(command + [killed, "--workers", "2"], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random().uniform(4, 14))
    os.killpg(process.pid, signal.SIGKILL)  # the sweep and its workers, as a crash would
    process.wait()
    subprocess.run(command + [killed, "--workers", "2"], check=True, capture_output=True)

    expected = accuracy_matrices(tmp_path / "reference")
    assert len(expected) == 5 and accuracy_matrices(tmp_path / "killed") == expected
    assert not [p for p in (tmp_path / "killed").rglob(".*")]  # no staging folder or log left behind
    runs, left_out = load_finished_runs(tmp_path / "killed")
    assert len(runs) == 5 and not left_out
    for path in (tmp_path / "killed").rglob("metrics.csv"):
        assert not pd.read_csv(path).duplicated(["metric", "step", "task"]).any()


def test_the_ray_executor_on_a_local_instance_gives_the_local_results(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install -e '.[ray]')")
    grid = [{"strategy": "naive", "seed": [0, 1]}]
    on_ray = write_sweep(tmp_path / "ray.yaml", tmp_path / "ray", grid)
    with monkeypatch.context() as patch:  # the runs must not go to local processes
        patch.setattr("clbench.sweep.on_local_processes", None)
        assert main(["sweep", on_ray, "--executor", "ray", "--workers", "2"]) == 0
    local = write_sweep(tmp_path / "local.yaml", tmp_path / "local", grid)
    assert main(["sweep", local, "--workers", "2"]) == 0
    expected = accuracy_matrices(tmp_path / "local")
    assert len(expected) == 2 and accuracy_matrices(tmp_path / "ray") == expected
    assert all(run.status == "done" for run in plan(on_ray))


def test_readme_sweep_example_is_a_valid_sweep(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("## Sweeps", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "sweep.yaml").write_text(example)
    assert len(plan(tmp_path / "sweep.yaml")) == 15

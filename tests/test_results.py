import json

import pandas as pd
import pytest
import yaml
from conftest import load_script

from clbench import results
from clbench.cli import main
from clbench.config import RunConfig
from clbench.registry import get_strategy
from clbench.runner import resolve, run


def test_interrupted_run_is_listed_apart_and_replaced(tiny_scenario, tmp_path):
    finished = run(RunConfig(scenario=tiny_scenario, results_dir=str(tmp_path))).run_dir
    interrupted = results.start_run(RunConfig(scenario=tiny_scenario, seed=1, results_dir=str(tmp_path)))
    (interrupted / "metrics.csv").write_text("half written")
    runs, unfinished = results.load_finished_runs(tmp_path)
    assert runs.seed.tolist() == [0] and unfinished == [(interrupted, "not finished")]
    assert runs.average_accuracy.item() == pytest.approx(
        pd.read_csv(finished / "accuracy_matrix.csv", index_col=0).iloc[-1].mean())
    # Starting the interrupted configuration again clears it.
    assert results.start_run(RunConfig(scenario=tiny_scenario, seed=1, results_dir=str(tmp_path))) == interrupted
    assert not (interrupted / "metrics.csv").exists()


def test_a_run_records_the_commit_it_started_under_not_one_made_while_it_ran(tiny_scenario, tmp_path, monkeypatch):
    commits = iter(["started-under", "committed-meanwhile"])
    monkeypatch.setattr(results, "git_commit", lambda: next(commits, "committed-meanwhile"))
    run_dir = run(RunConfig(scenario=tiny_scenario, results_dir=str(tmp_path))).run_dir
    assert json.loads((run_dir / "environment.json").read_text())["git_commit"] == "started-under"


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "table.csv"

    def failing_writer(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        results.atomic_write(target, failing_writer)
    assert list(tmp_path.iterdir()) == []


def fabricate_run(root, strategy, seed, accuracy, hparams=None, finished=True, data=None, **config):
    """A run folder as an older clbench wrote it: a few configuration fields (the others
    then have their defaults), and no data fingerprint unless `data`."""
    run_dir = root / "s" / "task" / strategy / f"seed{seed}"
    run_dir.mkdir(parents=True)
    config = {"scenario": "s", "setting": "task", "strategy": strategy, "seed": seed, "epochs": 1,
              "hparams": hparams or {}, **config}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if data:
        (run_dir / "environment.json").write_text(json.dumps({"data_fingerprint": data}))
    pd.DataFrame({"after_task": [1, 2], "task_1": [accuracy, accuracy], "task_2": [0.0, accuracy]}).to_csv(
        run_dir / "accuracy_matrix.csv", index=False)
    pd.DataFrame({"metric": ["average_accuracy", "accuracy", "train_time_s"], "step": [2, 2, 2],
                  "task": [None, 1, None], "value": [accuracy, 0.0, 3.0]}).to_csv(run_dir / "metrics.csv", index=False)
    if finished:
        (run_dir / results.COMPLETED).write_text("")


def test_summary_is_mean_and_std_over_seeds_of_each_configuration(tmp_path):
    fabricate_run(tmp_path, "a", 0, 0.5)
    fabricate_run(tmp_path, "a", 1, 0.7)
    fabricate_run(tmp_path, "a", 2, 0.1, finished=False)
    fabricate_run(tmp_path / "other", "a", 0, 0.9, hparams={"lam": 2})
    fabricate_run(tmp_path, "b", 0, 0.3)
    runs, unfinished = results.load_finished_runs(tmp_path)
    assert len(unfinished) == 1
    summary = results.summarise_runs(runs).set_index(["strategy", "hparams"])
    assert summary.loc[("a", ""), "runs"] == 2
    assert summary.loc[("a", ""), "average_accuracy_mean"] == pytest.approx(0.6)
    assert summary.loc[("a", ""), "average_accuracy_std"] == pytest.approx(0.1414214)
    assert summary.loc[("a", ""), "train_time_s_mean"] == pytest.approx(3.0)
    assert summary.loc[("a", "lam=2"), "average_accuracy_mean"] == pytest.approx(0.9)
    assert summary.loc[("b", ""), "runs"] == 1
    # The table shows each configuration once, hyperparameters where they differ.
    assert main(["table", str(tmp_path), "--output", str(tmp_path / "table.md")]) == 0
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert any("| a " in line and "0.600 ± 0.141" in line for line in lines)
    assert any("lam=2" in line and "0.900" in line for line in lines)


def test_the_table_shows_only_the_hyperparameters_that_differ(tmp_path, capsys):
    fabricate_run(tmp_path / "x", "a", 0, 0.5, hparams={"lam": 1, "mode": "online"})
    fabricate_run(tmp_path / "y", "a", 0, 0.7, hparams={"lam": 2, "mode": "online"})
    assert main(["table", str(tmp_path)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [("| lam=1 " in row, "| lam=2 " in row, "mode" in row) for row in rows] == [(True, False, False),
                                                                                       (False, True, False)]


@pytest.mark.parametrize("key,value", [("width", 64), ("lr", 0.1), ("data", "0123456789ab")])
def test_runs_that_differ_in_any_key_but_the_seed_are_reported_apart(key, value, tmp_path, capsys):
    fabricate_run(tmp_path, "a", 0, 0.5)
    fabricate_run(tmp_path, "a", 1, 0.7)
    fabricate_run(tmp_path / "other", "a", 0, 0.9, **{key: value})
    assert main(["table", str(tmp_path)]) == 0
    header, _, *rows = capsys.readouterr().out.splitlines()
    assert f"| {key} " in header and len(rows) == 2
    assert any("0.600 ± 0.141" in row for row in rows)
    assert any(f"| {value} " in row and "0.900" in row for row in rows)


def test_a_run_recorded_before_a_hyperparameter_existed_counts_as_its_default(tmp_path):
    today = {"ewc_lambda": 1000.0, "mode": "online", "decay_factor": 0.9}  # EWC's defaults
    fabricate_run(tmp_path, "ewc", 0, 0.5, hparams={"ewc_lambda": 1000.0, "mode": "online"})
    fabricate_run(tmp_path, "ewc", 1, 0.7, hparams=today)
    fabricate_run(tmp_path / "other", "ewc", 0, 0.9, hparams={**today, "decay_factor": 0.5})
    runs, _ = results.load_finished_runs(tmp_path)
    assert sorted(results.summarise_runs(runs).runs) == [1, 2]


def test_a_task_setting_run_records_the_class_setting_hyperparameters_at_their_defaults():
    defaults = get_strategy("ccgn").Hparams()
    asked = {"classifier_training": "after", "memory_size": 100}
    _, task_cfg = resolve(RunConfig(strategy="ccgn", setting="task", hparams=asked))
    assert (task_cfg.hparams["classifier_training"], task_cfg.hparams["memory_size"]) == (
        defaults.classifier_training, defaults.memory_size)
    _, class_cfg = resolve(RunConfig(strategy="ccgn", setting="class", hparams=asked))
    assert (class_cfg.hparams["classifier_training"], class_cfg.hparams["memory_size"]) == ("after", 100)
    # A task-setting run recorded with other values (e.g. an older default) is the same run.
    older = {**task_cfg.model_dump(), "hparams": {**task_cfg.hparams, **asked}}
    assert results.recorded_config(older)["hparams"] == task_cfg.hparams
    older_class = {**class_cfg.model_dump(), "hparams": {**class_cfg.hparams, "memory_size": 200}}
    assert results.recorded_config(older_class)["hparams"]["memory_size"] == 200


def test_the_table_pools_the_seeds_of_one_configuration_across_folders(tmp_path, capsys):
    fabricate_run(tmp_path / "sweep", "a", 0, 0.5)
    fabricate_run(tmp_path / "ablation", "a", 1, 0.7)
    fabricate_run(tmp_path / "ablation", "b", 0, 0.3, finished=False)
    assert main(["table", str(tmp_path / "sweep"), str(tmp_path / "ablation")]) == 0
    out, err = capsys.readouterr()
    assert "0.600 ± 0.141" in out and "| b " not in out
    assert "not finished" in err


def test_runs_are_counted_not_their_distinct_seeds(tmp_path):
    fabricate_run(tmp_path / "here", "a", 0, 0.5)
    fabricate_run(tmp_path / "there", "a", 0, 0.7)
    runs, _ = results.load_finished_runs(tmp_path)
    assert results.summarise_runs(runs).runs.tolist() == [2]


def test_a_diverged_run_reports_its_non_finite_losses(tiny_scenario, tmp_path):
    with pytest.warns(UserWarning, match="diverged"):
        run_dir = run(RunConfig(scenario=tiny_scenario, lr=1e12, results_dir=str(tmp_path))).run_dir
    table = pd.read_csv(run_dir / "metrics.csv").set_index("metric")
    assert table.loc["nonfinite_loss_iterations", "value"] > 0


DAMAGE = {
    "metrics.csv missing": lambda run: (run / "metrics.csv").unlink(),
    "matrix not numbers": lambda run: (run / "accuracy_matrix.csv").write_text("after_task,task_1\n1,garbage\n"),
    "matrix empty": lambda run: (run / "accuracy_matrix.csv").write_text(""),
    "matrix not square": lambda run: (run / "accuracy_matrix.csv").write_text("after_task,task_1\n1,0.5\n2,0.5\n"),
    "matrix out of range": lambda run: (run / "accuracy_matrix.csv").write_text(
        "after_task,task_1,task_2\n1,0.5,0.5\n2,1.5,0.5\n"),
    "config garbage": lambda run: (run / "config.yaml").write_text("::: [\n"),
    "config binary": lambda run: (run / "config.yaml").write_bytes(b"\xff\xfe\x00"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_run_is_left_out_and_the_others_are_reported(damage, tmp_path, capsys):
    fabricate_run(tmp_path, "a", 0, 0.5)
    fabricate_run(tmp_path, "a", 1, 0.7)
    DAMAGE[damage](tmp_path / "s" / "task" / "a" / "seed1")
    assert main(["table", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "0.500" in out and "0.600" not in out  # one seed counted, not two
    assert "damaged" in err and "seed1" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("strategy,hparams", [("replay", {"memory_size": 10**12}),
                                              ("agem", {"patterns_per_exp": 10**9})])
def test_stored_examples_are_what_is_stored_not_the_cap(strategy, hparams, tiny_scenario, tmp_path):
    run_dir = run(RunConfig(scenario=tiny_scenario, strategy=strategy, hparams=hparams,
                            results_dir=str(tmp_path))).run_dir
    table = pd.read_csv(run_dir / "metrics.csv").set_index("metric")
    assert table.loc["stored_examples", "value"] == 1000  # the tiny scenario's whole training set


def test_task_confusion_counts_each_test_sample_once_by_the_task_of_its_predicted_class(tiny_scenario, tmp_path):
    run_dir = run(RunConfig(scenario=tiny_scenario, setting="class", results_dir=str(tmp_path))).run_dir
    confusion = pd.read_csv(run_dir / "task_confusion.csv")
    per_task = confusion.groupby(["after_task", "true_task"]).samples.sum()
    assert len(per_task) == 25 and (per_task == 40).all()  # 20 test images of each of a task's 2 classes
    right_task = confusion[confusion.true_task == confusion.predicted_task]
    inference = pd.read_csv(run_dir / "task_inference_accuracy_matrix.csv", index_col="after_task")
    assert right_task.pivot(index="after_task", columns="true_task", values="samples").to_numpy() / 40 == \
        pytest.approx(inference.to_numpy(), abs=1e-6)
    assert (confusion[confusion.true_task != confusion.predicted_task].samples > 0).any()  # naive forgets


def test_the_paper_comparison_pools_folders_but_never_two_configurations_of_a_strategy(tmp_path):
    comparison = load_script("scripts", "paper_comparison").comparison
    reported = {"average_accuracy": {"task": {"a": 0.9}}, "macs_share_of_dense": {}}
    fabricate_run(tmp_path / "sweep", "a", 0, 0.5)
    fabricate_run(tmp_path / "ablation", "a", 1, 0.7)
    metrics, _ = results.load_metrics(tmp_path / "sweep", tmp_path / "ablation")
    row = comparison(metrics, reported).iloc[0]
    assert (row.clbench, row.runs) == ("0.600 ± 0.141", 2)
    fabricate_run(tmp_path / "other", "a", 0, 0.9, hparams={"lam": 2})
    metrics, _ = results.load_metrics(tmp_path / "sweep", tmp_path / "other")
    with pytest.raises(SystemExit, match="more than one configuration"):
        comparison(metrics, reported)

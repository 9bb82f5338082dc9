"""The command line end to end: the quickstart run, `list`, and bad input (exit code 2,
one line, no traceback)."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from clbench.cli import main
from clbench.registry import load_strategies


def test_quickstart_run_writes_a_complete_results_folder(tmp_path):
    assert main(["run", "--scenario", "split_mnist_mini", "--strategy", "naive", "--setting", "class",
                 "--results-dir", str(tmp_path)]) == 0
    run_dir = tmp_path / "split_mnist_mini" / "class" / "naive" / "seed0"
    expected = {"config.yaml", "tasks.csv", "accuracy_matrix.csv", "task_aware_accuracy_matrix.csv",
                "task_inference_accuracy_matrix.csv", "executed_macs_matrix.csv", "task_confusion.csv",
                "task_confusion.png", "metrics.csv", "environment.json", "accuracy_matrix.png", "task_accuracy.png",
                "COMPLETED"}
    assert expected == {p.name for p in run_dir.iterdir()}
    matrix = pd.read_csv(run_dir / "accuracy_matrix.csv")
    assert list(matrix.columns) == ["after_task"] + [f"task_{j}" for j in range(1, 6)]
    assert matrix.after_task.tolist() == [1, 2, 3, 4, 5]
    task_aware = pd.read_csv(run_dir / "task_aware_accuracy_matrix.csv", index_col="after_task")
    # Knowing the task can only help: restricting the prediction to the task's classes.
    assert (task_aware.to_numpy() >= matrix.set_index("after_task").to_numpy() - 1e-9).all()
    # And here it helps: after the last task naive predicts (nearly) only that task's
    # classes, yet restricted to an earlier task's two classes its outputs still tell
    # them apart (well above the plain accuracy on some earlier task).
    forgotten = task_aware.to_numpy()[-1, :-1] - matrix.set_index("after_task").to_numpy()[-1, :-1]
    assert forgotten.max() > 0.25
    # A correct prediction is always in the right task.
    task_inference = pd.read_csv(run_dir / "task_inference_accuracy_matrix.csv", index_col="after_task")
    assert (task_inference.to_numpy() >= matrix.set_index("after_task").to_numpy() - 1e-9).all()
    # The small CNN (width 32) on 28x28: two 3x3 convs, a 1568->128 and a 128->10 layer.
    macs = pd.read_csv(run_dir / "executed_macs_matrix.csv", index_col="after_task").to_numpy()
    assert (macs == 9 * 32 * 28**2 + 9 * 32 * 32 * 14**2 + 1568 * 128 + 128 * 10).all()
    table = pd.read_csv(run_dir / "metrics.csv")
    assert {"accuracy", "average_accuracy", "average_forgetting", "backward_transfer", "forward_transfer",
            "task_aware_average_accuracy", "train_time_s", "eval_time_s", "parameters"} <= set(table.metric)
    # What the numbers depend on: among them the instruction set of the CPU kernels.
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (run_dir / "accuracy_matrix.png").read_bytes()[:4] == b"\x89PNG"
    # The saved config repeats the run: it resolves to the same configuration.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["strategy"] == "naive" and saved["hparams"] == {}


def test_a_finished_run_is_kept_run_again_only_when_asked_and_never_mixed_with_another_config(
        tiny_scenario, tmp_path, capsys):
    args = ["run", "--scenario", tiny_scenario, "--results-dir", str(tmp_path)]
    completed = tmp_path / tiny_scenario / "task" / "naive" / "seed0" / "COMPLETED"
    assert main(args) == 0
    first = completed.read_text()
    capsys.readouterr()
    # The same configuration again: nothing is run, and the output says so.
    assert main(args) == 0
    assert "already finished" in capsys.readouterr().out
    assert completed.read_text() == first
    # Another configuration in the same folder: an error naming what differs.
    assert main(args + ["--epochs", "2"]) == 2
    error = capsys.readouterr().err
    assert "--overwrite" in error and "epochs" in error and len(error.strip().splitlines()) == 1
    assert main(args + ["--epochs", "2", "--overwrite"]) == 0
    assert "epochs: 2" in (completed.parent / "config.yaml").read_text()


def test_config_file_with_command_line_overrides(tiny_scenario, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"scenario": tiny_scenario, "strategy": "ewc", "seed": 3,
                                      "hparams": {"ewc_lambda": 5.0, "mode": "separate"}}))
    assert main(["run", "--config", str(config), "--seed", "4", "--hp", "ewc_lambda=7",
                 "--results-dir", str(tmp_path / "out")]) == 0
    saved = yaml.safe_load((tmp_path / "out" / tiny_scenario / "task" / "ewc" / "seed4" / "config.yaml").read_text())
    assert saved["seed"] == 4
    assert saved["hparams"] == {"ewc_lambda": 7.0, "mode": "separate", "decay_factor": 0.9}


def test_a_strategy_with_its_own_optimiser_refuses_the_runs_and_records_its_own(tiny_scenario, tmp_path, capsys):
    args = ["run", "--scenario", tiny_scenario, "--strategy", "ccgn", "--results-dir", str(tmp_path)]
    assert main(args + ["--lr", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the run does not use lr: strategy 'ccgn' has its own" in err and "\n" not in err
    assert main(args) == 0
    config = tmp_path / tiny_scenario / "task" / "ccgn" / "seed0" / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    assert [saved[key] for key in ("optimizer", "lr", "momentum")] == [None, None, None]
    assert (saved["hparams"]["optimizer"], saved["hparams"]["lr"]) == ("adam", load_strategies()["ccgn"].Hparams().lr)
    # The saved configuration still repeats the run.
    capsys.readouterr()
    assert main(["run", "--config", str(config)]) == 0
    assert "already finished" in capsys.readouterr().out


def test_same_seed_same_accuracy_matrix(tiny_scenario, tmp_path):
    for name in ("a", "b"):
        assert main(["run", "--scenario", tiny_scenario, "--strategy", "lwf", "--seed", "1",
                     "--results-dir", str(tmp_path / name)]) == 0
    a, b = ((tmp_path / n / tiny_scenario / "task" / "lwf" / "seed1" / "accuracy_matrix.csv").read_text() for n in "ab")
    assert a == b


def test_list_shows_strategies_settings_hyperparameters_and_scenarios(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in load_strategies():
        assert f"  {name} " in out
    assert "ewc_lambda: float = 1000.0" in out
    assert "icarl    [class]" in out
    assert "split_mnist_mini" in out and "split_mnist " in out


@pytest.mark.parametrize("args,message", [
    (["--scenario", "nope"], "unknown scenario 'nope'"),
    (["--strategy", "nope"], "unknown strategy 'nope'"),
    (["--strategy", "ewc", "--hp", "lambda=3"], "lambda: Extra inputs are not permitted"),
    (["--strategy", "ewc", "--hp", "ewc_lambda=-1"], "ewc_lambda: Input should be greater than or equal to 0"),
    (["--strategy", "ewc", "--hp", "mode=sometimes"], "mode: Input should be 'separate' or 'online'"),
    (["--strategy", "icarl", "--setting", "task"], "supports only the class setting"),
    (["--lr", "0"], "lr: Input should be greater than 0"),
    (["--optimizer", "adam", "--momentum", "0.5"], "the run does not use momentum: Adam has none"),
    (["--strategy", "hat", "--optimizer", "sgd"], "the run does not use optimizer: strategy 'hat' has its own"),
    (["--backbone", "resnet1000"], "unknown backbone 'resnet1000'"),
    (["--hp", "no-equals-sign"], "--hp expects KEY=VALUE"),
    (["--device", "bogus"], "unknown device 'bogus'"),
    pytest.param(["--device", "cuda"], "CUDA GPU(s) on this machine; use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    (["--seed", "99999999999999999999"], "seed: Input should be less than or equal to 4294967295"),
    (["--seed", "4294967296"], "seed: Input should be less than or equal to 4294967295"),
    (["--lr", "inf"], "lr: Input should be a finite number"),
    (["--lr", "1e308"], "lr: Input should be less than or equal to"),
    (["--strategy", "ewc", "--hp", "ewc_lambda=inf"], "ewc_lambda: Input should be a finite number"),
    (["--strategy", "ccgn", "--hp", "sparsity=nan"], "sparsity: Input should be a finite number"),
    (["--width", "100000"], "choose a smaller --width"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path, capsys):
    assert main(["run", "--results-dir", str(tmp_path)] + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.parametrize("content,message", [
    (b"\x00\x01\xff\xfe", "cannot read config file"),
    (b"hparams:\n  - 1\n", "hparams must be a mapping"),
    (b"seed: 1\nseed: 2\n", "duplicate key 'seed'"),
    (b"hparams: {ewc_lambda: 1, ewc_lambda: 2}\n", "duplicate key 'ewc_lambda'"),
    (b"seed: [1\n", "cannot read config file"),
])
def test_bad_config_file_is_one_line_and_exit_code_2(content, message, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_bytes(content)
    assert main(["run", "--config", str(config), "--results-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_results_dir_under_a_file_is_one_line_and_exit_code_2(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["run", "--results-dir", str(tmp_path / "file" / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert "choose a writable --results-dir" in err and "\n" not in err


def test_overwrite_keeps_the_finished_run_until_the_new_one_completes(tiny_scenario, tmp_path, monkeypatch):
    args = ["run", "--scenario", tiny_scenario, "--results-dir", str(tmp_path)]
    run_dir = tmp_path / tiny_scenario / "task" / "naive" / "seed0"
    assert main(args) == 0
    before = (run_dir / "accuracy_matrix.csv").read_text()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process were stopped while the new run trains

    with monkeypatch.context() as patch:
        patch.setattr("clbench.runner.evaluate", killed)
        assert main(args + ["--epochs", "2", "--overwrite"]) == 1  # "aborted"
    assert (run_dir / "COMPLETED").exists() and (run_dir / "accuracy_matrix.csv").read_text() == before
    assert "epochs: 1" in (run_dir / "config.yaml").read_text()
    assert main(args + ["--epochs", "2", "--overwrite"]) == 0
    assert "epochs: 2" in (run_dir / "config.yaml").read_text()
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["seed0"]  # no staging folder left


def test_bad_input_leaves_no_run_folder_marked_complete(tmp_path):
    assert main(["run", "--backbone", "nope", "--results-dir", str(tmp_path)]) == 2
    assert not list(tmp_path.rglob("COMPLETED"))


def test_click_usage_errors_exit_2(capsys):
    assert main(["run", "--setting", "both"]) == 2
    assert main(["run", "--epochs", "many"]) == 2


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys, where not even root may make folders")
def test_a_results_dir_nobody_may_write_is_one_line_and_exit_code_2(capsys):
    assert main(["run", "--results-dir", "/sys/kernel/clbench-runs"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Operation not permitted" in err and "choose a writable --results-dir" in err and "\n" not in err


def test_missing_data_offline_in_a_fresh_process(tmp_path):
    """Exit code 2, one line naming the files, no traceback (network forced unreachable)."""
    code = ("import sys, clbench.datasets.loaders as d; d.network_reachable = lambda url, timeout=3.0: False;"
            "from clbench.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "run", "--scenario", "split_mnist", "--data-root",
                           str(tmp_path), "--results-dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("clbench: error")]
    assert len(lines) == 1 and "train-images-idx3-ubyte" in lines[0] and "--data-root" in lines[0]
    assert "Traceback" not in done.stderr


def test_console_script_unknown_strategy(tmp_path):
    clbench = Path(sys.executable).parent / "clbench"
    done = subprocess.run([str(clbench), "run", "--strategy", "nope", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "unknown strategy 'nope'" in done.stderr


def test_tensorboard_logs_loss_accuracy_per_task_and_gate_usage(tiny_scenario, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["run", "--scenario", tiny_scenario, "--strategy", "ccgn", "--results-dir", str(tmp_path / "runs"),
                 "--tensorboard", str(tmp_path / "tb")]) == 0
    events = EventAccumulator(str(tmp_path / "tb" / tiny_scenario / "task" / "ccgn" / "seed0"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert any(tag.startswith("Loss_MB/train_phase") for tag in tags)  # Avalanche's, per mini-batch
    assert [event.step for event in events.Scalars("clbench/average_accuracy")] == [1, 2, 3, 4, 5]
    assert "clbench/accuracy/task_5" in tags
    assert any(tag.startswith("clbench/gate_usage/") for tag in tags)

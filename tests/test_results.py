import pandas as pd
import pytest

from clbench import results
from clbench.config import RunConfig
from clbench.errors import UserError
from clbench.runner import run


def test_interrupted_run_is_listed_apart_and_replaced(tiny_scenario, tmp_path):
    finished = run(RunConfig(scenario=tiny_scenario, results_dir=str(tmp_path)))
    interrupted = results.start_run(RunConfig(scenario=tiny_scenario, seed=1, results_dir=str(tmp_path)), False)
    (interrupted / "metrics.csv").write_text("half written")
    runs, unfinished = results.load_finished_runs(tmp_path)
    assert runs.seed.tolist() == [0] and unfinished == [interrupted]
    assert runs.average_accuracy.item() == pytest.approx(
        pd.read_csv(finished / "accuracy_matrix.csv", index_col=0).iloc[-1].mean())
    # Starting the interrupted configuration again clears it; a finished one is protected.
    assert results.start_run(RunConfig(scenario=tiny_scenario, seed=1, results_dir=str(tmp_path)), False) == interrupted
    assert not (interrupted / "metrics.csv").exists()
    with pytest.raises(UserError, match="--overwrite"):
        results.start_run(RunConfig(scenario=tiny_scenario, results_dir=str(tmp_path)), False)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "table.csv"

    def failing_writer(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        results.atomic_write(target, failing_writer)
    assert list(tmp_path.iterdir()) == []

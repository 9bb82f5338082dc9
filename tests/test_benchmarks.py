"""The training benchmarks under `benchmarks/` run on a tiny size and write their tables."""

import importlib.util
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_overhead_benchmark_writes_its_table(tmp_path, capsys):
    train_overhead = benchmark("train_overhead")
    output = tmp_path / "train_overhead.csv"
    train_overhead.main(["--tiny", "--threads", "1", "--tasks", "1", "--output", str(output)])
    table = pd.read_csv(output)
    assert list(table.columns) == train_overhead.COLUMNS
    assert set(table.backbone) == {"small_cnn", "resnet18"}
    assert set(table.variant) == {"bare", "bare_nchw", "avalanche_naive", "naive", "ewc", "naive_adam", "ccgn"}
    assert (table.best_ms > 0).all() and (table.best_ms <= table.median_ms).all()
    assert (table[table.variant == "bare"].speed_vs_bare == 1).all()
    assert table.ccgn_vs_ungated.notna().sum() == 2
    assert "speed vs bare" in capsys.readouterr().out


def test_scaling_benchmark_writes_its_table(tmp_path, capsys):
    scaling = benchmark("scaling")
    output = tmp_path / "scaling.csv"
    scaling.main(["--tiny", "--threads", "1", "--tasks", "5", "10", "--strategies", "naive", "--settings", "class",
                  "--output", str(output)])
    table = pd.read_csv(output)
    assert list(table.columns) == scaling.COLUMNS
    assert list(table.tasks) == [5, 10] and set(table.strategy) == {"naive"}
    assert (table.train_s_per_task > 0).all() and (table.eval_s_last_step > 0).all()
    assert (table.peak_rss_mb >= table.start_rss_mb).all() and (table.start_rss_mb > 0).all()
    assert "peak RSS" in capsys.readouterr().out

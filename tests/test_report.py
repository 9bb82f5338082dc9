"""`clbench report`: tables, every figure type, the comparison of two folders, and the
HTML page rendered in headless Chromium."""

import shutil

import pandas as pd
import pytest

from clbench.cli import main
from clbench.config import RunConfig
from clbench.plots import Palette
from clbench.report import compare, format_mean_std
from clbench.results import load_finished_runs
from clbench.runner import run
from test_results import fabricate_run

FIGURES = ["average_accuracy", "task_accuracy", "matrices", "forgetting", "accuracy_vs_macs", "accuracy_vs_size",
           "capacity", "gate_usage"]
CLASS_FIGURES = [*FIGURES[:6], "task_confusion"]  # the fixture's class-setting run


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, tiny_scenario_module):
    """Real runs on the tiny scenario: two seeds of naive, one of ccgn and hat (which save
    gate and capacity tables), one of naive in the class setting (task confusion), and one
    unfinished run; then the report."""
    root = tmp_path_factory.mktemp("runs")
    for strategy, seeds in (("naive", (0, 1)), ("ccgn", (0,)), ("hat", (0,))):
        for seed in seeds:
            run(RunConfig(scenario=tiny_scenario_module, strategy=strategy, seed=seed, results_dir=str(root)))
    run(RunConfig(scenario=tiny_scenario_module, setting="class", results_dir=str(root)))
    unfinished = root / tiny_scenario_module / "task" / "naive" / "seed7"
    unfinished.mkdir(parents=True)
    (unfinished / "config.yaml").write_text("strategy: naive\n")
    damaged = root / tiny_scenario_module / "task" / "naive" / "seed8"
    shutil.copytree(root / tiny_scenario_module / "task" / "naive" / "seed0", damaged)
    (damaged / "accuracy_matrix.csv").write_text("after_task,task_1\n1,garbage\n")
    assert main(["report", str(root)]) == 0
    return root / "report"


def test_report_writes_tables_and_every_figure(report_dir):
    summary = pd.read_csv(report_dir / "summary.csv").query("setting == 'task'")
    assert sorted(summary.strategy) == ["ccgn", "hat", "naive"]
    assert summary.set_index("strategy").runs.to_dict() == {"ccgn": 1, "hat": 1, "naive": 2}
    assert "±" in summary.set_index("strategy").loc["naive", "accuracy"]
    assert r"\pm" in (report_dir / "summary.tex").read_text()
    for name in FIGURES:
        for suffix in ("png", "pdf"):
            assert (report_dir / "figures" / f"tiny_task_{name}.{suffix}").stat().st_size > 1000, name
    for name in CLASS_FIGURES:
        assert (report_dir / "figures" / f"tiny_class_{name}.png").stat().st_size > 1000, name
    page = (report_dir / "report.html").read_text()
    assert page.count("<img src=\"data:image/png;base64,") == len(FIGURES) + len(CLASS_FIGURES)
    # Listed apart, with why, not mixed in.
    assert "seed7</li>" not in page and "seed7: not finished" in page
    assert "seed8: damaged" in page


def test_comparison_flags_differences_beyond_the_seed_spread(tmp_path):
    for seed, accuracy in ((0, 0.50), (1, 0.70)):
        fabricate_run(tmp_path / "before", "a", seed, accuracy)
    for seed, accuracy in ((0, 0.90), (1, 0.92)):
        fabricate_run(tmp_path / "after", "a", seed, accuracy)
    before, _ = load_finished_runs(tmp_path / "before")
    after, _ = load_finished_runs(tmp_path / "after")
    rows = compare(before, after).set_index("metric")
    assert rows.loc["average_accuracy", "difference"] == pytest.approx(0.31)
    assert rows.loc["average_accuracy", "spread"] == pytest.approx(0.1414214)
    assert rows.loc["average_accuracy", "exceeds_spread"]
    assert not rows.loc["train_time_s", "exceeds_spread"]  # 3.0 s in both


def test_a_single_run_on_either_side_of_a_comparison_flags_nothing(tmp_path):
    fabricate_run(tmp_path / "one", "a", 0, 0.5)
    for seed, accuracy in ((0, 0.90), (1, 0.92)):
        fabricate_run(tmp_path / "two", "a", seed, accuracy)
    one, _ = load_finished_runs(tmp_path / "one")
    two, _ = load_finished_runs(tmp_path / "two")
    for a, b in ((one, two), (two, one)):
        rows = compare(a, b)
        assert rows.spread.isna().all() and rows.exceeds_spread.isna().all()


def test_a_strategy_keeps_its_style_whatever_else_a_report_shows():
    assert Palette(["naive"])("naive") == Palette(["ewc", "hat", "naive", "unregistered"])("naive")


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs Debian's chromium and chromium-driver (installed by .ci/run)")
def test_html_report_renders_in_headless_chromium(report_dir):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get((report_dir / "report.html").as_uri())
        sizes = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    finally:
        driver.quit()
    assert len(sizes) == len(FIGURES) + len(CLASS_FIGURES)
    assert all(complete and width > 100 and height > 100 for complete, width, height in sizes)
    assert errors == []


def test_a_mean_that_rounds_to_zero_shows_no_minus_sign():
    assert format_mean_std(-1e-5, float("nan"), "average_forgetting") == "0.000"
    assert format_mean_std(-4e-4, 1e-3, "average_forgetting") == "0.000 ± 0.001"


def test_a_report_of_several_folders_pools_their_runs_into_the_first_ones_report(tmp_path):
    fabricate_run(tmp_path / "sweep", "a", 0, 0.5)
    fabricate_run(tmp_path / "ablation", "a", 1, 0.7)
    assert main(["report", str(tmp_path / "sweep"), str(tmp_path / "ablation")]) == 0
    summary = pd.read_csv(tmp_path / "sweep" / "report" / "summary.csv")
    assert summary.runs.tolist() == [2] and summary.accuracy.tolist() == ["0.600 ± 0.141"]

"""The training benchmarks under `benchmarks/` run on a tiny size and write their tables."""

import subprocess
import sys
from functools import partial
from itertools import product
from unittest import mock

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, load_script

from clbench import compact, models
from clbench.benchmarking import LAYOUT_USERS, benchmark_parser, interleaved_times, layout, trained_network
from clbench.config import RunConfig
from clbench.datasets.scenarios import build_scenario
from clbench.models import ModelSpec
from clbench.registry import get_strategy
from clbench.runner import run

benchmark = partial(load_script, "benchmarks")


def tiny_table(script, output, *arguments: str) -> pd.DataFrame:
    """The table a benchmark script writes to `output` on its tiny size with one thread,
    whose columns must be the script's."""
    script.main(["--tiny", "--threads", "1", *arguments, "--output", str(output)])
    table = pd.read_csv(output)
    assert list(table.columns) == script.COLUMNS
    return table


def test_a_benchmark_parser_has_the_shared_options_and_writes_beside_its_script_by_default():
    parser = benchmark_parser(str(ROOT / "benchmarks" / "scaling.py"), "Times a thing.\n\nHow.", "width 4", rounds=3)
    args = parser.parse_args([])
    assert parser.description == "Times a thing."
    assert args.output == ROOT / "benchmarks" / "results" / "scaling.csv"
    assert (args.rounds, args.tiny, args.threads) == (3, False, torch.get_num_threads()) and "repeats" not in vars(args)
    args = parser.parse_args(["--tiny", "--threads", "1", "--output", "elsewhere.csv"])
    assert (args.tiny, args.threads, str(args.output)) == (True, 1, "elsewhere.csv")


def test_train_overhead_benchmark_writes_its_table(tmp_path, capsys):
    train_overhead = benchmark("train_overhead")
    output = tmp_path / "train_overhead.csv"
    table = tiny_table(train_overhead, output, "--tasks", "1")
    assert set(table.backbone) == {"small_cnn", "resnet18"}
    assert set(table.variant) == {"bare", "bare_nchw", "avalanche_naive", "naive", "ewc", "naive_adam", "ccgn"}
    assert (table.best_ms > 0).all() and (table.best_ms <= table.median_ms).all()
    assert (table[table.variant == "bare"].speed_vs_bare == 1).all()
    assert table.ccgn_vs_ungated.notna().sum() == 2
    assert "speed vs bare" in capsys.readouterr().out


def test_train_overhead_benchmark_times_only_the_chosen_backbones_and_variants(tmp_path):
    output = tmp_path / "train_overhead.csv"
    benchmark("train_overhead").main(["--tiny", "--threads", "1", "--tasks", "1", "--backbones", "resnet18",
                                      "--variants", "ccgn", "--output", str(output)])
    table = pd.read_csv(output)
    assert table.backbone.tolist() == ["resnet18"] * 3 and table.variant.tolist() == ["bare", "naive_adam", "ccgn"]
    assert table.ccgn_vs_ungated.notna().sum() == 1


def test_train_overhead_benchmark_profiles_one_variant_without_a_table(tmp_path, capsys):
    output = tmp_path / "train_overhead.csv"
    assert benchmark("train_overhead").main(["--tiny", "--threads", "1", "--tasks", "1", "--profile", "ccgn",
                                             "--output", str(output)]) == []
    printed = capsys.readouterr().out
    assert "small_cnn (width 4), ccgn:" in printed and "resnet18 (width 2), ccgn:" in printed
    assert "aten::convolution_backward" in printed and not output.exists()


def test_channel_counts_benchmark_writes_its_table(tmp_path):
    channel_counts = benchmark("channel_counts")
    output = tmp_path / "channel_counts.csv"
    table = tiny_table(channel_counts, output)
    assert len(table) == len(channel_counts.SHAPES) * len(channel_counts.OUT_CHANNELS)
    assert set(table.operation) == {"conv", "max_pool", "grouped_conv"}
    assert (table.best_ms > 0).all() and (table.best_ms <= table.median_ms).all()


def test_grouped_strides_benchmark_times_each_stride_as_it_is_and_with_a_zero_channel(tmp_path, monkeypatch):
    strides = benchmark("grouped_strides")
    monkeypatch.setattr(compact, "ALIASED_STRIDE_BYTES", 32)  # the tiny size's strides: 32 and 64 bytes
    padded = []
    monkeypatch.setattr(strides, "with_zero_channel", lambda values, groups: padded.append(values.shape) or
                        compact.with_zero_channel(values, groups))
    table = tiny_table(strides, tmp_path / "grouped_strides.csv")
    assert padded[:1] == [(1, 2 * 4, 8, 8)], "the zero channel's execution should add it"
    assert list(zip(table.in_channels, table.execution)) == [(2, "as_is"), (2, "zero_channel"), (4, "as_is"),
                                                             (4, "zero_channel")]
    assert list(table.stride_bytes) == [32, 32, 64, 64] and table.aliased.all()
    assert (table.best_ms > 0).all() and (table.best_ms <= table.median_ms).all()
    monkeypatch.setattr(compact, "ALIASED_STRIDE_BYTES", 64)
    assert [row["aliased"] for row in strides.main(["--tiny", "--output", str(tmp_path / "again.csv")])] == \
        [False, False, True, True]


def test_per_sample_positions_benchmark_writes_its_table(tmp_path, capsys, monkeypatch):
    positions = benchmark("per_sample_positions")
    output = tmp_path / "per_sample_positions.csv"
    table = tiny_table(positions, output, "--allowed", "0.5", "--thresholds", "0", "100")
    assert list(table.execution) == ["compact", "per_sample", "per_sample"]
    assert list(table.threshold.fillna(-1)) == [-1, 0, 100]
    assert (table.best_ms > 0).all() and (table.best_ms <= table.median_ms).all()
    assert "x" in capsys.readouterr().out
    conv = compact.CompactConv.per_sample
    monkeypatch.setattr(compact.CompactConv, "per_sample", lambda self, x, index: -conv(self, x, index))
    with pytest.raises(SystemExit, match="computed something else"):
        positions.main(["--tiny", "--threads", "1", "--allowed", "0.5", "--output", str(output)])


def test_batch_thresholds_benchmark_writes_its_table(tiny_scenario, tmp_path, capsys, monkeypatch):
    thresholds = benchmark("batch_thresholds")
    output = tmp_path / "batch_thresholds.csv"
    arguments = ["--tiny", "--threads", "1", "--trained-on", tiny_scenario, "--output", str(output)]
    thresholds.main([*arguments, "--batches", "1", "4"])
    table = pd.read_csv(output)
    assert list(table.columns) == thresholds.COLUMNS
    networks = {("small_cnn", "trained"), ("small_cnn", "random"), ("resnet18", "random")}
    assert set(zip(table.backbone, table.gates)) == networks and len(table) == len(networks) * 2 * (4 + 5)
    assert set(table.query("setting == 'task'").execution) == {"kept", "per_sample", "dense", "clbench"}
    assert set(table.query("setting == 'class'").execution) == {"kept", "per_sample", "stacked", "dense_every_path",
                                                                 "clbench"}
    assert table.query("setting == 'task'").extra_macs.isna().all()
    class_rows = table.query("setting == 'class'")
    assert (class_rows.extra_macs >= 0).all() and class_rows.query("gates == 'random'").extra_macs.gt(0).all()
    assert set(table.batch) == {1, 4} and dict(zip(table.batch, table.repeats)) == {1: 64, 4: 16}
    assert (table.best_ms > 0).all() and (table.best_ms <= table.median_ms).all()
    assert "over dense" in capsys.readouterr().out
    from clbench.compact import CompactPath
    run_stacked = CompactPath.stacked

    def negated_logits(path, x, stages):
        read, logits, macs = run_stacked(path, x, stages)
        return read, [-chunk for chunk in logits], macs

    monkeypatch.setattr(CompactPath, "stacked", negated_logits)
    with pytest.raises(SystemExit, match="computed different things"):
        thresholds.main([*arguments, "--batches", "2"])


def test_path_build_benchmark_writes_its_table(tiny_scenario, tmp_path, capsys, monkeypatch):
    """The table, and what each timed build builds: every learned task's path, and in the
    class setting every learned path as one."""
    build, built = benchmark("path_build"), []

    def timed(builds, rounds, repeats):
        built.append({name: call() for name, call in builds.items()})
        return interleaved_times(builds, rounds, repeats)

    monkeypatch.setattr(build, "interleaved_times", timed)
    table = tiny_table(build, tmp_path / "path_build.csv", "--trained-on", tiny_scenario)
    tasks = tuple(range(5))
    assert [[path.tasks for path in paths["each_task"]] for paths in built] == [[(t,) for t in tasks]] * 6
    assert [paths["stacked"].tasks for paths in built if "stacked" in paths] == [tasks] * 3
    networks = {("small_cnn", "trained"), ("small_cnn", "random"), ("resnet18", "random")}
    assert set(zip(table.backbone, table.gates)) == networks and len(table) == len(networks) * 3
    assert list(table.query("setting == 'task'").paths) == ["each_task"] * 3
    assert list(table.query("setting == 'class'").paths) == ["each_task", "stacked"] * 3
    assert (table.tasks == 5).all() and (table.repeats == 1).all()
    assert (table.best_ms > 0).all() and (table.best_ms <= table.median_ms).all()  # a build takes time
    assert "tasks" in capsys.readouterr().out


def test_the_inference_benchmarks_time_the_networks_of_finished_runs(tiny_scenario, tmp_path):
    """With --runs, the gated benchmarks time the networks those runs trained (read from
    their checkpoints), and only those; a run without a checkpoint, or whose network has no
    per-task paths, is refused with the reason."""
    runs = {strategy: run(RunConfig(scenario=tiny_scenario, strategy=strategy, setting="class", width=8,
                                    results_dir=str(tmp_path), keep_checkpoints=True)).run_dir
            for strategy in ("ccgn", "naive")}
    _, spec, model, images = trained_network(runs["ccgn"])
    test = build_scenario(tiny_scenario, "class").benchmark.test_stream[0].dataset
    assert model.tasks_learned == 5 and (spec.backbone, spec.width, spec.setting) == ("small_cnn", 8, "class")
    assert torch.equal(images[:3], torch.stack([test[i][0] for i in range(3)]))
    more = trained_network(runs["ccgn"], len(test) + 2)[3]  # as many as the largest batch timed, cycled
    assert len(more) == len(test) + 2 and torch.equal(more[-2:], images[:2])
    for script, arguments in (("gated_inference", ()), ("batch_thresholds", ("--batches", "1"))):
        table = tiny_table(benchmark(script), tmp_path / f"{script}.csv", "--runs", str(runs["ccgn"]), *arguments)
        assert set(zip(table.backbone, table.width, table.gates, table.trained_on, table.setting)) == \
            {("small_cnn", 8, "trained", f"{tiny_scenario}, epochs 1", "class")}
    with pytest.raises(SystemExit, match="naive run"):
        trained_network(runs["naive"])
    (runs["ccgn"] / "checkpoint.pt").unlink()
    with pytest.raises(SystemExit, match="no checkpoint"):
        trained_network(runs["ccgn"])


def test_scaling_benchmark_writes_its_table(tmp_path, capsys):
    scaling = benchmark("scaling")
    output = tmp_path / "scaling.csv"
    table = tiny_table(scaling, output, "--tasks", "5", "10", "--strategies", "naive", "--settings", "class")
    assert list(table.tasks) == [5, 10] and set(table.strategy) == {"naive"}
    assert (table.train_s_per_task > 0).all() and (table.eval_s_last_step > 0).all()
    assert (table.peak_rss_mb >= table.start_rss_mb).all() and (table.start_rss_mb > 0).all()
    assert "peak RSS" in capsys.readouterr().out


def test_channels_last_effect_benchmark_writes_its_table(tmp_path):
    effect = benchmark("channels_last_effect")
    output = tmp_path / "channels_last_effect.csv"
    table = tiny_table(effect, output)
    assert list(zip(table.setting, table.strategy)) == [("task", "naive"), ("class", "ccgn")]
    assert ((table.nchw_s > 0) & (table.channels_last_s > 0)).all()
    accuracies = table[["final_accuracy_nchw", "final_accuracy_channels_last"]].to_numpy()
    assert ((accuracies > 0) & (accuracies <= 1)).all()


def test_the_nchw_layout_of_the_benchmarks_patches_every_conversion():
    """The benchmarks' NCHW baseline is NCHW only if every module that converts images is
    patched: those holding `channels_last` are LAYOUT_USERS, and under the patch no conv
    sees a channels-last input, dense or masked."""
    holders = {name for name, module in list(sys.modules.items())
               if name.startswith("clbench") and getattr(module, "channels_last", None) is models.channels_last}
    assert holders == set(LAYOUT_USERS)
    for strategy, backbone in product(["naive", "ccgn"], ["small_cnn", "resnet18"]):
        model = get_strategy(strategy).from_hparams({}).make_model(
            ModelSpec(backbone, 8, (3, 32, 32), "task", [[0, 1]]))
        inputs = []
        for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.register_forward_pre_hook(lambda module, args: inputs.append(args[0].is_contiguous()))
        x, t = torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
        with layout("nchw"):
            model.forward_path(x, 0) if strategy == "ccgn" else model(x, t)
        assert inputs and all(inputs)


def test_the_nchw_layout_leaves_channels_last_behind_in_a_fresh_process():
    """Patching before the modules holding the conversion are imported would leave one of
    them NCHW for good (it would import the patched function and keep it when the patch
    ends); a benchmark's first case runs before anything else imported them."""
    check = ("from clbench.benchmarking import layout\n"
             "with layout('nchw'): pass\n"
             "import clbench.compact, clbench.models, clbench.path_network\n"
             "assert clbench.path_network.channels_last is clbench.models.channels_last\n"
             "assert clbench.compact.channels_last is clbench.models.channels_last\n")
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, check=True)


def test_freezable_batch_norm_benchmark_checks_the_alternatives_compute_the_same(tmp_path):
    freezable = benchmark("freezable_batch_norm")
    output = tmp_path / "freezable_batch_norm.csv"
    table = tiny_table(freezable, output)
    variants = {"clbench", "constant_frozen", "two_batch_norms", "single_pass"}
    layers, steps = table[table.scope == "batch_norm"], table[table.scope == "ccgn_step"]
    assert len(layers) == 4 * len(freezable.SHAPES) * len(freezable.FROZEN_SHARES) and set(layers.variant) == variants
    assert len(steps) == 4 and set(steps.variant) == variants
    differences = layers[freezable.DIFFERENCES]
    assert (differences < 1e-4).all().all()
    assert (differences[layers.variant == "constant_frozen"] == 0).all().all(), "only the frozen parameters' gradients change"
    assert (differences[layers.variant == "two_batch_norms"] > 0).any().any(), "a difference should be measured"
    assert (table[table.variant == "clbench"].ratio_to_clbench_best == 1).all()


def test_compact_revisions_benchmark_times_this_checkout_against_a_commit(tmp_path, monkeypatch):
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout: no commit to compare with")
    revisions = benchmark("compact_revisions")
    output = tmp_path / "compact_revisions.csv"
    # ResNet-18, never trained here, computes each sample's channels only when told.
    resnet_per_sample = partial(mock.patch.object, compact.CompactResNet18, "per_sample", autospec=True,
                                side_effect=compact.CompactResNet18.per_sample)
    with resnet_per_sample() as per_sample:
        table = tiny_table(revisions, output, "--against", "HEAD", "--batches", "2", "5")
    assert len(table) == 3 * 2 * 2 and (table.ratio_best > 0).all()
    assert sorted(set(table.batch)) == [2, 5] and not per_sample.called
    with resnet_per_sample() as per_sample:
        revisions.main(["--tiny", "--against", "HEAD", "--batches", "2", "--per-sample-from-batch", "2",
                        "--output", str(output)])
    assert per_sample.called
    with pytest.raises(SystemExit, match="cannot read clbench/compact.py"):
        revisions.main(["--tiny", "--against", "no-such-revision", "--output", str(output)])
    one_task_paths = "0e95ba2"  # the last commit whose compact paths each served one task
    if not subprocess.run(["git", "cat-file", "-e", f"{one_task_paths}^{{commit}}"], cwd=ROOT).returncode:
        with pytest.raises(SystemExit, match="cuts a path for one task"):
            revisions.main(["--tiny", "--against", one_task_paths, "--output", str(output)])
    # A checkout whose compact paths count other MACs is refused, not timed.
    total = compact.MacCount.total
    monkeypatch.setattr(compact.MacCount, "total", lambda count: total(count) + 1)
    with pytest.raises(SystemExit, match="other outputs or MACs"):
        revisions.main(["--tiny", "--against", "HEAD", "--output", str(output)])


def test_allocator_benchmark_compares_processes_with_and_without_kept_memory(tmp_path, capsys):
    allocator = benchmark("allocator")
    output = tmp_path / "allocator.csv"
    table = tiny_table(allocator, output)
    assert set(table.workload) == {"small_cnn_train", "small_cnn_eval", "resnet18_train", "resnet18_eval",
                                   "run_naive", "run_ccgn"}
    faults = table[table.workload == "small_cnn_eval"].set_index("variant").page_faults_per_call
    # Only clbench's processes keep their memory (their heap still grows over the first calls).
    assert faults["clbench"] < faults["glibc_default"] / 3
    assert "speed" in capsys.readouterr().out


def test_pool_before_relu_benchmark_finds_both_orders_equal_and_sees_a_wrong_one(tmp_path, monkeypatch):
    pool_before_relu = benchmark("pool_before_relu")
    output = tmp_path / "pool_before_relu.csv"
    table = tiny_table(pool_before_relu, output)
    assert set(table.workload) == {"small_cnn_train", "small_cnn_eval", "ccgn_train"}
    assert (table.max_output_difference == 0).all() and (table.max_gradient_difference == 0).all()
    # The former order really is the other one: each ReLU before the pooling it followed.
    layers = [type(layer) for layer in pool_before_relu.relu_first(models.SmallCNN().body)]
    assert layers[:6] == [torch.nn.Conv2d, torch.nn.ReLU, torch.nn.MaxPool2d] * 2
    # The comparison reaches ccgn's masked network: a former order without its ReLU differs.
    monkeypatch.setattr(pool_before_relu, "relu_then_pool", lambda x: F.max_pool2d(x, 2))
    table = pd.DataFrame(pool_before_relu.main(["--tiny", "--threads", "1", "--output", str(output)]))
    assert (table[table.workload == "ccgn_train"].max_output_difference > 0).all()


def test_ccgn_step_parts_times_every_variant_on_both_networks_and_trains_what_ccgn_trains(tmp_path, monkeypatch):
    """Compiled too, each variant's step as one graph (`fullgraph`: a graph break, such as a
    batch norm branching on its frozen channels, fails it) of its own, giving its eager
    twin's loss (the script checks; with one code object for every variant's loss, the
    variants ran the first one's graph); AOT autograd without inductor's code generation,
    for the test's time."""
    parts = benchmark("ccgn_step_parts")
    mask = parts.GatedLayer.mask
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="aot_eager"))
    table = tiny_table(parts, tmp_path / "ccgn_step_parts.csv", "--compile")
    assert parts.GatedLayer.mask is mask, "the variants' masks must not outlive their steps"
    assert sorted(zip(table.backbone, table.variant, table.compiled)) == sorted(
        product(["small_cnn", "resnet18"], parts.VARIANTS, [False, True]))
    eager_ungated = table[(table.variant == "ungated") & ~table.compiled]
    assert (eager_ungated.ratio_to_ungated_best == 1).all() and (table.best_ms > 0).all()
    model = parts.CCGN.make_model(ModelSpec("small_cnn", 4, (1, 28, 28), "task", [[0, 1], [2, 3]]))
    trained = set(map(id, parts.trained_parameters(model, 1)))
    layer = model.path_layers[0]
    assert {id(layer.layer.weight), id(model.heads[1].weight)} | set(map(id, layer.gates[1].parameters())) <= trained
    assert not trained & ({id(model.heads[0].weight)} | set(map(id, layer.gates[0].parameters())))


@pytest.mark.parametrize("script", ["path_build", "train_overhead", "ccgn_step_parts"])
@pytest.mark.parametrize("width", ["0", "1.5", "²"])
def test_a_resnet_width_that_is_not_a_whole_number_of_at_least_1_is_refused_in_one_line(script, width, tmp_path,
                                                                                          capsys):
    with pytest.raises(SystemExit):
        benchmark(script).main(["--tiny", "--resnet-width", width, "--output", str(tmp_path / "table.csv")])
    assert f"'{width}' is not a width: give a whole number of at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("allowed", ["0", "1.5", "half"])
def test_an_allowed_share_outside_0_to_1_is_refused_in_one_line(allowed, tmp_path, capsys):
    with pytest.raises(SystemExit):
        benchmark("gated_inference").main(["--tiny", "--allowed", allowed, "--output", str(tmp_path / "table.csv")])
    assert f"'{allowed}' is not a share: give a number above 0 and at most 1" in capsys.readouterr().err

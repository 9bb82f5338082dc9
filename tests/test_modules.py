"""Modules attached to runs: every registered module on a seconds-long run (parametrised
over the registry), post-training quantisation and data-free quantisation on their own,
learned-threshold pruning, and the configuration of modules from YAML and the command
line."""

import copy

import pandas as pd
import pytest
import torch
import yaml
from clbench.modules import ltp, ptq
from conftest import load_script, run_until_first_checkpoint, train_tasks
from torch import nn
from torch.nn.utils import parametrize

from clbench.cli import main
from clbench.config import RunConfig, parse_module
from clbench.models import ModelSpec, build_model
from clbench.plots import cost_points, pareto_front
from clbench.registry import get_strategy, load_modules
from clbench.report import configurations, write_report
from clbench.results import load_metrics, with_labels
from clbench.runner import run

TWO_TASKS = dict(classes_per_task=5, width=4, epochs=1)  # the tiny scenario cut to 2 tasks


def run_dir_of(tiny_scenario, tmp_path, **options):
    cfg = RunConfig(scenario=tiny_scenario, results_dir=str(tmp_path), **TWO_TASKS, **options)
    return run(cfg).run_dir


def matrix(run_dir, name="accuracy_matrix.csv"):
    return pd.read_csv(run_dir / name, index_col="after_task")


@pytest.fixture(scope="module")
def plain_run(tiny_scenario_module, tmp_path_factory):
    return run_dir_of(tiny_scenario_module, tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize("name", list(load_modules()))
def test_every_module_runs_with_its_defaults(name, plain_run, tiny_scenario_module, tmp_path):
    """A module that only evaluates (no training plugins) leaves the float results as the
    plain run's and reports variants; one that trains (grad_l1) may have none of its own."""
    trains = bool(load_modules()[name].from_options({}).plugins())
    run_dir = run_dir_of(tiny_scenario_module, tmp_path, modules=[name])
    float_matrix = matrix(run_dir)
    if not trains:
        pd.testing.assert_frame_equal(float_matrix, matrix(plain_run))
    variants = [p.name.split("@", 1)[1].removesuffix(".csv") for p in run_dir.glob("accuracy_matrix@*.csv")]
    assert variants or trains, f"module {name} reported no variant"
    table = pd.read_csv(run_dir / "metrics.csv")
    for variant in variants:
        assert matrix(run_dir, f"accuracy_matrix@{variant}.csv").shape == float_matrix.shape
        for metric in ("average_accuracy", "average_forgetting", "executed_macs", "model_size_bits", "sparsity"):
            after = {2} if metric == "average_forgetting" else {1, 2}  # forgetting needs two tasks
            assert set(table[table.metric == f"{metric}@{variant}"].step) >= after, f"{metric}@{variant}"
    assert load_modules()[name].summary()


def test_ptq_reports_every_bit_width_and_granularity_with_sizes_in_bits(tiny_scenario, tmp_path):
    run_dir = run_dir_of(tiny_scenario, tmp_path, modules=[{"name": "ptq", "bits": [8, 4], "dfq": True}])
    names = {f"w{b}a{b}_{g}_dfq" for b in (8, 4) for g in ("per_channel", "per_tensor")}
    assert names == {p.name.split("@", 1)[1].removesuffix(".csv") for p in run_dir.glob("accuracy_matrix@*.csv")}
    table = pd.read_csv(run_dir / "metrics.csv").query("task.isna()").set_index(["metric", "step"]).value
    float_bits = 8 * table["model_size_bytes", 2]
    assert table["model_size_bits@w8a8_per_channel_dfq", 2] < float_bits
    assert table["model_size_bits@w4a4_per_channel_dfq", 2] < table["model_size_bits@w8a8_per_channel_dfq", 2]
    # Quantising does not change the dense compute.
    assert table["executed_macs@w4a4_per_tensor_dfq", 2] == table["executed_macs", 2]


def test_ptq_quantises_the_layers_of_gated_networks(tiny_scenario, tmp_path):
    run_dir = run_dir_of(tiny_scenario, tmp_path, strategy="hat",
                         modules=[{"name": "ptq", "bits": [4], "granularity": ["per_channel"]}])
    assert matrix(run_dir, "accuracy_matrix@w4a4_per_channel.csv").shape == (2, 2)



def test_the_gate_flip_script_separates_flipped_gates_from_the_rest(tiny_scenario, tmp_path, capsys, monkeypatch):
    """With a 'quantised' copy whose gate networks are negated and whose layers are the
    float ones, the script counts flipped gates, and forcing the float masks gives back
    exactly the float accuracy."""
    run_dir = run_dir_of(tiny_scenario, tmp_path, strategy="ccgn", keep_checkpoints=True)

    def negated_gates(self, model, calibration, n_tasks):
        copied = copy.deepcopy(model)
        for layer in copied.path_layers:
            for name, child in layer.named_children():
                if name not in ("layer", "norm", "tied"):
                    for parameter in child.parameters():
                        parameter.data.neg_()
        return {"negated": ptq.Variant(copied, {})}

    monkeypatch.setattr(ptq.PostTrainingQuantisation, "variants", negated_gates)
    load_script("scripts", "ptq_gate_flips").main([str(run_dir)])
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| negated")]
    assert len(rows) == 2
    assert all(float(row[5]) > 0.1 for row in rows)  # gate decisions flipped
    assert all(row[4] == row[2] for row in rows)  # the float gates: the float accuracy
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("bits", [8, 6, 4])
def test_quantised_weights_take_at_most_2_to_the_bits_values(bits, granularity):
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 16, 16) * torch.logspace(-2, 1, 6)[:, None, None, None]
    quantised = ptq.quantised_weight(weight, bits, granularity)
    groups = list(quantised) if granularity == "per_channel" else [quantised]
    assert all(len(group.unique()) <= 2 ** bits for group in groups)
    # The grid is used: each channel (per channel) or the tensor (per tensor) has more than
    # 2**(bits - 1) values, so the bound above is tight enough to catch an extra level.
    assert all(len(group.unique()) > 2 ** (bits - 1) for group in groups)
    # Close to the float weights: within half a step of the largest channel's grid.
    assert (quantised - weight).abs().max() <= weight.abs().max() / (2 ** (bits - 1) - 0.5)


def unbalanced_small_cnn():
    """A small CNN whose channels are rescaled across layers (the same function), so that
    per-channel weight ranges differ by orders of magnitude."""
    torch.manual_seed(0)
    model = build_model(ModelSpec("small_cnn", 8, (1, 28, 28), "task", [[0, 1], [2, 3]]))
    conv1, _, _, conv2, _, _, _, _fc, _ = model.features.body
    scale = torch.logspace(-2, 2, 8)
    with torch.no_grad():
        conv1.weight *= scale[:, None, None, None]
        conv1.bias *= scale
        conv2.weight /= scale[None, :, None, None]
    return model


def range_spread(weight: torch.Tensor, axis: int) -> float:
    """Largest over smallest range of the weights of one channel along `axis` (0: output, 1: input)."""
    flat = weight.transpose(0, axis).flatten(1)
    ranges = flat.max(1).values - flat.min(1).values
    return (ranges.max() / ranges.min()).item()


def test_equalisation_keeps_the_function_and_narrows_per_channel_ranges():
    model = unbalanced_small_cnn()
    x, t = torch.rand(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)
    equalised = copy.deepcopy(model)
    ptq.equalise(equalised)
    torch.testing.assert_close(equalised(x, t), model(x, t), rtol=1e-4, atol=1e-5)
    assert len(ptq.equalisation_pairs(model)) == 2  # conv1-conv2, conv2-fc through the flatten
    (conv1, conv2), _ = ptq.equalisation_pairs(model)
    (equalised_conv1, equalised_conv2), _ = ptq.equalisation_pairs(equalised)
    assert range_spread(equalised_conv1.weight, 0) < 0.01 * range_spread(conv1.weight, 0)
    assert range_spread(equalised_conv2.weight, 1) < 0.01 * range_spread(conv2.weight, 1)


def test_equalisation_folds_resnet18s_batch_norms_keeps_the_function_and_narrows_per_channel_ranges():
    """Batch norms with scales over three orders of magnitude, folded into the convolutions
    before them: each residual block's conv1-conv2 pair is then equalised."""
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet18", 8, (3, 32, 32), "task", [[0, 1]])).eval()
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, nn.BatchNorm2d):
                norm.weight.copy_(torch.logspace(-2, 1, len(norm.weight))[torch.randperm(len(norm.weight))])
                norm.running_mean.uniform_(-1, 1)
                norm.running_var.uniform_(0.5, 2)
    x, t = torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    folded = ptq.fold_batch_norms(copy.deepcopy(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x, t), model(x, t), rtol=1e-4, atol=1e-4)
    assert not ptq.equalisation_pairs(model)  # unfolded: batch norm between the convolutions
    pairs = ptq.equalisation_pairs(folded)
    assert len(pairs) == 8
    spreads = [range_spread(conv1.weight, 0) for conv1, _ in pairs]
    ptq.equalise(folded)
    torch.testing.assert_close(folded(x, t), model(x, t), rtol=1e-4, atol=1e-4)
    assert all(range_spread(conv1.weight, 0) < 0.1 * spread for (conv1, _), spread in zip(pairs, spreads))


def test_bias_correction_reduces_the_mean_output_error():
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.rand(64, 8, 12, 12) + torch.linspace(0, 2, 8)[None, :, None, None]  # post-ReLU-like, mean far from 0
    expected = layer(x)
    float_weight = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.copy_(ptq.quantised_weight(float_weight, 4, "per_tensor"))
    error_before = (layer(x) - expected).mean(dim=(0, 2, 3)).abs().mean()
    ptq.correct_bias(layer, float_weight, ptq.channel_means(x))
    error_after = (layer(x) - expected).mean(dim=(0, 2, 3)).abs().mean()
    assert error_after < 0.5 * error_before


def test_module_syntax_on_the_command_line():
    assert parse_module("ptq") == {"name": "ptq"}
    assert parse_module("ptq:bits=[8,4],granularity=[per_tensor],dfq=true") == {
        "name": "ptq", "bits": [8, 4], "granularity": ["per_tensor"], "dfq": True}


@pytest.mark.parametrize("args,message", [
    (["--module", "nope"], "unknown module 'nope'"),
    (["--module", "ptq:bits=[9]"], "invalid options for module 'ptq'"),
    (["--module", "ptq:colour=red"], "invalid options for module 'ptq'"),
    (["--module", "ptq:bits"], "--module expects"),
    (["--strategy", "hat", "--module", "ptq:dfq=true"], "dfq needs"),
    # The task classifier has a linear-ReLU-linear pair, yet the gates read rescaled inputs.
    (["--strategy", "ccgn", "--setting", "class", "--module", "ptq:dfq=true"], "dfq needs"),
    (["--module", "grad_l1:weight=-1"], "invalid options for module 'grad_l1'"),
    (["--module", "grad_l1:activation_weight=.nan"], "invalid options for module 'grad_l1'"),
    (["--module", "relaxed_quant:bits=9"], "invalid options for module 'relaxed_quant'"),
    (["--module", "relaxed_quant:temperature=0"], "invalid options for module 'relaxed_quant'"),
    (["--module", "relaxed_quant:final_temperature=2"], "must not exceed temperature"),
    (["--strategy", "hat", "--module", "relaxed_quant"], "relaxed_quant does not support ccgn and HAT"),
    (["--strategy", "ccgn", "--module", "relaxed_quant"], "relaxed_quant does not support ccgn and HAT"),
    (["--module", "ltp:temperature=0"], "invalid options for module 'ltp'"),
    # Each would remove the other's parametrisation of the weights.
    (["--module", "ltp", "--module", "relaxed_quant"], "modules ltp and relaxed_quant both reparametrise"),
    (["--module", "ltp", "--module", "ltp:l0_weight=2"], "modules ltp and ltp both reparametrise"),
    (["--module", "ltp:target_sparsity=1"], "invalid options for module 'ltp'"),
    # Its thresholds would prune weights these strategies keep fixed for past tasks.
    (["--strategy", "hat", "--module", "ltp"], "ltp cannot run with hat, hat_tc or packnet"),
    (["--strategy", "hat_tc", "--setting", "class", "--module", "ltp"], "ltp cannot run with hat, hat_tc or packnet"),
    (["--strategy", "packnet", "--epochs", "2", "--module", "ltp"], "ltp cannot run with hat, hat_tc or packnet"),
])
def test_bad_modules_exit_2_with_one_line(args, message, tiny_scenario, tmp_path, capsys):
    assert main(["run", "--scenario", tiny_scenario, "--results-dir", str(tmp_path), *args]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / tiny_scenario).exists()


def test_modules_from_the_config_file_and_the_command_line_replacing_them(tiny_scenario, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"scenario": tiny_scenario, **TWO_TASKS,
                                      "modules": [{"name": "ptq", "bits": [4], "granularity": ["per_tensor"]}]}))
    assert main(["run", "--config", str(config), "--results-dir", str(tmp_path / "a")]) == 0
    run_dir = tmp_path / "a" / tiny_scenario / "task" / "naive" / "seed0"
    assert [p.name for p in run_dir.glob("accuracy_matrix@*")] == ["accuracy_matrix@w4a4_per_tensor.csv"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["modules"] == [{"name": "ptq", "bits": [4], "granularity": ["per_tensor"], "dfq": False,
                                 "calibration_examples": 256}]
    assert main(["run", "--config", str(config), "--module", "ptq:bits=[6],granularity=[per_channel]",
                 "--results-dir", str(tmp_path / "b")]) == 0
    run_dir = tmp_path / "b" / tiny_scenario / "task" / "naive" / "seed0"
    assert [p.name for p in run_dir.glob("accuracy_matrix@*")] == ["accuracy_matrix@w6a6_per_channel.csv"]


def test_list_shows_modules_with_their_options(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    modules = out.split("Modules", 1)[1].split("Scenarios:", 1)[0]
    assert "  ptq " in modules and "bits: list[int] = [8, 6, 4]" in modules and "dfq: bool = False" in modules
    assert "  ltp " in modules and "target_sparsity: float|None = None" in modules


def test_a_report_sets_each_module_variant_beside_its_model_at_its_own_cost(tiny_scenario, tmp_path):
    run_dir_of(tiny_scenario, tmp_path / "runs", modules=[{"name": "ptq", "bits": [8, 4], "granularity": ["per_channel"]}])
    write_report([str(tmp_path / "runs")], tmp_path / "report")
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert {"accuracy @w8a8_per_channel", "size (Mbit) @w4a4_per_channel"} <= set(summary.columns)
    metrics, _ = load_metrics(str(tmp_path / "runs"))
    [[(_, _, frame)]] = configurations(with_labels(metrics)).values()
    final = frame[frame.task.isna() & (frame.step == 2)].set_index("metric").value
    points = {variant: (cost.mean(), accuracy.mean()) for variant, cost, accuracy in cost_points(frame, "model_size_bytes")}
    assert points == {"": (final["model_size_bytes"], final["average_accuracy"]),
                      **{v: (final[f"model_size_bits@{v}"] / 8, final[f"average_accuracy@{v}"])
                         for v in ("w8a8_per_channel", "w4a4_per_channel")}}
    # The variants table: the trained model, then each variant, with its own numbers.
    variants = pd.read_csv(tmp_path / "report" / "variants.csv", dtype=str, keep_default_na=False)
    assert variants.variant.tolist() == ["", "w4a4_per_channel", "w8a8_per_channel"]
    assert variants.accuracy.tolist() == [f"{final['average_accuracy' + at]:.3f}"
                                          for at in ("", "@w4a4_per_channel", "@w8a8_per_channel")]
    assert variants["size (Mbit)"].tolist() == [f"{bits / 1e6:.3f}" for bits in (
        8 * final["model_size_bytes"], final["model_size_bits@w4a4_per_channel"], final["model_size_bits@w8a8_per_channel"])]


def test_the_pareto_front_keeps_the_points_nothing_beats_on_both_cost_and_accuracy():
    points = [(2.0, 0.4), (1.0, 0.5), (3.0, 0.9), (0.5, 0.2), (3.0, 0.8), (4.0, 0.9)]
    assert pareto_front(points) == [(0.5, 0.2), (1.0, 0.5), (3.0, 0.9)]


def soft_thresholded_cnn(threshold: float) -> nn.Module:
    """A single-head small CNN (every layer in every forward pass) with ltp's soft thresholds."""
    torch.manual_seed(0)
    model = build_model(ModelSpec("small_cnn", 4, (1, 28, 28), "class", [[0, 1], [2, 3]]))
    ltp.attach(model, threshold, temperature=0.05)
    return model


def test_ltp_thresholds_are_parameters_trained_by_the_task_loss_and_raised_by_the_l0_term():
    model = soft_thresholded_cnn(1.0)
    thresholds = [soft.threshold for _, soft in ltp.thresholds(model)]
    assert len(thresholds) == 3 and {id(t) for t in thresholds} <= {id(p) for p in model.parameters()}
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 4, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(t.grad.isfinite() and t.grad != 0 for t in thresholds)
    model.zero_grad()
    ltp.kept_share(model).backward()
    assert all(t.grad < 0 for t in thresholds)  # a higher threshold keeps fewer weights


def test_ltp_passes_the_task_gradient_to_a_weight_scaled_by_its_mask():
    """The paper's dv/dw = mask: without the soft mask's slope, which made EWC diverge."""
    model = soft_thresholded_cnn(1.0)
    (weight, soft), layer = ltp.thresholds(model)[0], ltp.pruned_layers(model)[0]
    upstream = torch.randn_like(weight)
    (layer.weight * upstream).sum().backward()
    torch.testing.assert_close(weight.grad, upstream * soft.mask(weight).detach())


def test_ltp_deploys_exact_zeros_below_the_thresholds_and_leaves_the_trained_network_as_it_was():
    model = soft_thresholded_cnn(1.0)  # tau = the mean squared weight: 1/sqrt(3) of uniform weights below it
    x = torch.rand(8, 1, 28, 28)
    soft_output = model(x)
    pruned = ltp.deployed(model, 0.0, 0.05)
    zeros = total = 0
    for (weight, soft), layer in zip(ltp.thresholds(model), ltp.pruned_layers(pruned)):
        assert not parametrize.is_parametrized(layer)
        below = weight.pow(2) < soft.threshold * soft.scale
        assert torch.equal(layer.weight, torch.where(below, 0.0, weight))  # kept weights unscaled
        zeros, total = zeros + below.sum().item(), total + below.numel()
    assert 0.5 < zeros / total < 0.65
    torch.testing.assert_close(model(x), soft_output)  # the copy's pruning did not reach the original
    assert not torch.allclose(pruned(x), soft_output)


def test_ltp_on_ccgn_prunes_a_tasks_kernels_for_good_when_they_freeze(tiny_scenario):
    """A past task's path, float and deployed, gives the same outputs after a later task
    moved the thresholds; its kernels hold exact zeros where pruned and are outside the
    soft mask, while the free kernels are still soft-thresholded."""
    seen = {}

    def check(strategy, scenario, task):
        model = strategy.model.eval()
        x = next(iter(torch.utils.data.DataLoader(scenario.benchmark.test_stream[0].dataset.eval(), batch_size=64)))[0]
        with torch.no_grad():
            outputs = model.forward_single_task(x, 0), ltp.deployed(model, 0.0, 0.05).forward_single_task(x, 0)
        thresholds = [soft.threshold.item() for _, soft in ltp.thresholds(model)]
        if task == 0:
            seen.update(outputs=outputs, thresholds=thresholds)
            return
        assert thresholds != seen["thresholds"], "the later task should move the thresholds"
        assert all(torch.equal(after, before) for after, before in zip(outputs, seen["outputs"]))
        for path_layer, layer in ltp.path_layer_weights(model):
            weight, soft = layer.parametrizations.weight.original, layer.parametrizations.weight[0]
            assert torch.equal(soft.fixed, path_layer.frozen)
            assert torch.equal(layer.weight[soft.fixed], weight[soft.fixed])  # no soft mask on them
            assert (weight[soft.fixed] == 0).any()
        free = [soft.mask(weight)[~soft.fixed] for weight, soft in ltp.thresholds(model)]
        assert any(((m > 0) & (m < 1)).any() for m in free), "free kernels should stay soft-thresholded"

    options = load_modules()["ltp"].Options(l0_weight=5)
    train_tasks(get_strategy("ccgn"), tiny_scenario, "task", 2, "small_cnn", 8, {"lr": 0.01}, check,
                plugins=[ltp.LearnedThresholds(options)])


def test_the_free_kernel_script_prunes_a_fresh_initialisation_at_the_layers_threshold():
    """Default (uniform) initialisation has w^2 / E[w^2] = 3 u^2, u uniform on [0, 1], so a
    threshold of 0.75 prunes half of a fresh kernel's weights, whatever the trained free
    kernels hold."""
    script = load_script("scripts", "ltp_free_kernels")
    torch.manual_seed(0)
    model = get_strategy("ccgn").from_hparams({}).make_model(ModelSpec("small_cnn", 32, (1, 28, 28), "task", [[0, 1]]))
    ltp.attach(model, 0.75, 0.05)
    with torch.no_grad():
        for path_layer, layer in ltp.path_layer_weights(model):
            layer.parametrizations.weight.original[4:].mul_(10)  # trained free kernels: 95% above the threshold
            path_layer.frozen[:4] = True
        ltp.prune_frozen_kernels_for_good(model)  # frozen at their initial weights: half kept
    rows = script.layer_table(model)
    assert [row["layer"] for row in rows] == list(model.named_path_layers())
    assert all(row["threshold"] == pytest.approx(0.75) and row["frozen"] == 4 for row in rows)
    assert all(row["fresh_pruned"] == pytest.approx(0.5, abs=0.08) for row in rows)
    assert all(0.4 < row["fresh_mask"] < 0.6 for row in rows)
    assert all(row["frozen_kept"] == pytest.approx(0.5, abs=0.15) for row in rows)


def test_ltp_holds_a_target_sparsity_and_measures_the_deployed_network(tiny_scenario, tmp_path):
    config = RunConfig(scenario=tiny_scenario, width=8, results_dir=str(tmp_path),
                       modules=[{"name": "ltp", "target_sparsity": 0.5, "l0_weight": 5}])
    run_dir = run(config).run_dir  # five tasks of two digits
    table = pd.read_csv(run_dir / "metrics.csv").query("task.isna()").set_index(["metric", "step"]).value
    for step in range(1, 6):
        assert abs(table["sparsity@ltp", step] - 0.5) < 0.05
    # The hard-pruned network predicts nearly as the soft-thresholded one it was trained as
    # (each task has 40 test images: one image is 0.025).
    deployed = matrix(run_dir, "accuracy_matrix@ltp.csv")
    assert deployed.iloc[0, 0] > 0.9 and (deployed - matrix(run_dir)).abs().to_numpy().mean() < 0.03
    # Half the weights at 32 bits, a bit each for where they are: about 17/32 of the float size.
    assert 0.5 < table["model_size_bits@ltp", 5] / (8 * table["model_size_bytes", 5]) < 0.6
    # Unstructured zeros are still multiplied: the dense count.
    assert table["executed_macs@ltp", 5] == table["executed_macs", 5]
    # scripts/module_trajectory.py reads the same metrics, task after task.
    trajectory = load_script("scripts", "module_trajectory").trajectory
    assert trajectory(run_dir, "w4a4_per_channel") is None  # a variant the run does not have
    row = trajectory(run_dir, "ltp")
    assert row["modules"] == "ltp:l0_weight=5.0,target_sparsity=0.5"
    assert [row[f"sparsity {step}"] for step in range(1, 6)] == [
        round(table["sparsity@ltp", step], 3) for step in range(1, 6)]
    assert row["accuracy 1"] == round(deployed.iloc[0, 0], 3)


def test_ltp_end_to_end_from_the_command_line_with_ptq_quantising_its_pruned_weights(tiny_scenario, tmp_path):
    assert main(["run", "--scenario", tiny_scenario, "--classes-per-task", "5", "--width", "4", "--module",
                 "ltp:l0_weight=5", "--module", "ptq:bits=[8],granularity=[per_channel]",
                 "--results-dir", str(tmp_path)]) == 0
    run_dir = tmp_path / tiny_scenario / "task" / "naive" / "seed0"
    assert (run_dir / "accuracy_matrix@ltp.csv").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["modules"][0] == {
        "name": "ltp", "temperature": 0.05, "l0_weight": 5.0, "initial_threshold": 0.0, "target_sparsity": None}
    table = pd.read_csv(run_dir / "metrics.csv").query("task.isna()").set_index(["metric", "step"]).value
    assert table["sparsity@ltp", 2] > 0.3
    # ptq quantises the weights as evaluated, soft-thresholded: the pruned ones round to zero.
    assert abs(table["sparsity@w8a8_per_channel", 2] - table["sparsity@ltp", 2]) < 0.05


def test_an_ltp_run_resumes_from_its_checkpoint_as_if_never_interrupted(tiny_scenario, tmp_path, capsys):
    reference = run_dir_of(tiny_scenario, tmp_path / "a", modules=["ltp"])
    config = RunConfig(scenario=tiny_scenario, results_dir=str(tmp_path / "b"), modules=["ltp"], **TWO_TASKS)
    run_until_first_checkpoint(config)
    capsys.readouterr()
    resumed = run(config).run_dir
    assert "after task 1" in capsys.readouterr().err
    for name in ("accuracy_matrix.csv", "accuracy_matrix@ltp.csv"):
        assert (resumed / name).read_text() == (reference / name).read_text()

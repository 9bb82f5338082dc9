"""What the scripts under `benchmarks/` share: Split-MNIST-like scenarios of any number of
tasks from the embedded MNIST subset, the gated networks the inference benchmarks time,
PyTorch's thread count and the backbones' memory layout while they measure, the columns
that say where a measurement was taken, and writing their tables."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from importlib import metadata
from itertools import product
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import torch

# Every module that converts images to channels-last holds its own name for
# `clbench.models.channels_last`: all are imported here, before `layout` patches them (one
# imported under the patch would keep the patched function for good).
import clbench.compact  # noqa: F401
import clbench.models  # noqa: F401
import clbench.path_network  # noqa: F401

from clbench.allocator import keep_freed_memory
from clbench.config import RunConfig
from clbench.datasets.images import ImageArrayDataset
from clbench.datasets.loaders import load_split_mnist_mini
from clbench.datasets.scenarios import SCENARIOS
from clbench.models import ModelSpec
from clbench.path_network import TaskPathNet
from clbench.registry import get_strategy
from clbench.results import git_commit
from clbench.runner import load_checkpointed_run, run
from clbench.sweep import available_cores


def split_mnist_mini_tasks(tasks: int, train_per_class: int, test_per_class: int) -> str:
    """Registers a Split-MNIST-like scenario of `tasks` (a multiple of 5) two-digit tasks
    built from the embedded MNIST subset and returns its name. Task k holds digits
    2(k mod 5) and 2(k mod 5) + 1 under pixel permutation k // 5, the first five tasks
    being Split MNIST's, unpermuted; each digit under each permutation is a class of its
    own. Each digit keeps its first `train_per_class` / `test_per_class` images."""
    if tasks % 5:
        raise ValueError(f"tasks must be a multiple of 5, not {tasks}")
    permutations = [torch.arange(28 * 28)] + [torch.randperm(28 * 28, generator=torch.Generator().manual_seed(p))
                                              for p in range(1, tasks // 5)]

    def permuted(split: ImageArrayDataset, per_class: int) -> ImageArrayDataset:
        targets = torch.tensor(split.targets)
        kept = torch.cat([torch.nonzero(targets == digit).flatten()[:per_class] for digit in range(10)])
        pixels, targets = split.images[kept].flatten(1), targets[kept]
        return ImageArrayDataset(torch.cat([pixels[:, order].view(-1, 1, 28, 28) for order in permutations]),
                                 torch.cat([targets + 10 * p for p in range(len(permutations))]))

    def load(root, cache):
        train, test, _ = load_split_mnist_mini(root, cache)
        return (permuted(train, train_per_class), permuted(test, test_per_class),
                f"embedded MNIST subset, {train_per_class} / {test_per_class} images per digit, {len(permutations)} "
                "pixel permutations")

    name = f"split_mnist_mini_{tasks}tasks_{train_per_class}_{test_per_class}"
    SCENARIOS[name] = dataclasses.replace(SCENARIOS["split_mnist_mini"], name=name, n_classes=2 * tasks, load=load,
                                          description=f"{tasks} Split-MNIST-like tasks (benchmarks only)")
    return name


# Every variant a benchmark times runs with the memory allocation clbench's runs have
# (`clbench.runner.run` sets it too), from the first measurement on.
keep_freed_memory()

LAYOUT_USERS = ("clbench.models", "clbench.path_network", "clbench.compact")


def layout(name: str) -> ExitStack:
    """A context in which the backbones run in layout `name`: "channels_last" (clbench's)
    or "nchw" (PyTorch's default: the conversion patched out)."""
    stack = ExitStack()
    if name == "nchw":
        for module in LAYOUT_USERS:
            stack.enter_context(mock.patch(f"{module}.channels_last", lambda images: images))
    return stack


@contextmanager
def torch_threads(threads: int):
    """PyTorch's thread count set to `threads` (a benchmark's --threads) while the context
    is open."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine_columns() -> dict:
    """The machine, its cores, PyTorch's threads and the versions, for every CSV row."""
    return {"machine": platform.processor() or platform.machine(), "cores": available_cores(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "avalanche": metadata.version("avalanche-lib"), "clbench_commit": git_commit()}


def interleaved_times(calls: dict[str, Callable[[], object]], rounds: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each of `calls`, `rounds` times, the calls alternating from
    round to round (A B A B ...) so that a change in the machine's load reaches all alike;
    each round times `repeats` calls in a row."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            times[name].append((time.perf_counter() - start) / repeats)
    return times


def best_and_median_ms(measured: list[float]) -> dict:
    """The best and the median of a variant's seconds per call, in milliseconds."""
    return {"best_ms": round(1e3 * min(measured), 3), "median_ms": round(1e3 * statistics.median(measured), 3)}


def machine_line(machine: dict) -> str:
    """`machine_columns()` as the last line of a benchmark's table."""
    return (f"machine: {machine['machine']}, {machine['cores']} cores, torch threads {machine['torch_threads']}, "
            f"torch {machine['torch']}")


def write_csv(rows: list[dict], columns: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"written: {path}")


# Inputs the inference benchmarks time their batches on, unless told otherwise: their
# largest batch.
BENCHMARK_IMAGES = 64
RANDOM_GATED_TASKS = 5
RANDOM_GATED_ALLOWED = 0.25  # share of each layer's kernels each task may open


def random_gated_model(spec: ModelSpec, allowed: float = RANDOM_GATED_ALLOWED) -> TaskPathNet:
    """ccgn's network with `RANDOM_GATED_TASKS` tasks learned by hand, without training (so
    that ResNet-18 fits on a CPU): each task allowed a random share `allowed` of every
    layer's kernels, with untrained gating modules that open about half of those per
    sample; their batch norms, like the backbone's, hold the statistics of random inputs."""
    model = get_strategy("ccgn").from_hparams({}).make_model(spec)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for norm in norms:
            norm.momentum = None  # a cumulative average over the tasks' passes
        for task in range(RANDOM_GATED_TASKS):
            model.forward_path(torch.randn(64, *spec.input_shape), task)
        for norm in norms:
            norm.momentum = 0.1
        for layer in model.path_layers:
            for task in range(RANDOM_GATED_TASKS):
                layer.freeze(task, torch.rand(layer.out_units) < allowed)
    model.tasks_learned = RANDOM_GATED_TASKS
    return model.eval()


def trained_gated_model(scenario: str, setting: str, width: int, folder: str,
                        images: int = BENCHMARK_IMAGES) -> tuple[ModelSpec, TaskPathNet, torch.Tensor]:
    """ccgn's small CNN trained by clbench on `scenario` (1 epoch per task, seed 0) into
    `folder`, as `trained_network` reads it."""
    cfg = RunConfig(scenario=scenario, strategy="ccgn", setting=setting, width=width, keep_checkpoints=True,
                    results_dir=folder)
    return trained_network(run(cfg).run_dir, images)[1:]


def trained_network(run_dir: Path,
                    images: int = BENCHMARK_IMAGES) -> tuple[RunConfig, ModelSpec, TaskPathNet, torch.Tensor]:
    """The network of a finished run whose checkpoint was kept (`clbench run
    --keep-checkpoints`): the run's configuration, the network's spec, the network, and
    `images` of the scenario's test images of the first task (from its first on, again
    from the first where the task has fewer). Exits with the reason where the run has no
    checkpoint or its network has no per-task paths."""
    cfg, data, state = load_checkpointed_run(run_dir)
    model = state["trainer"].model.eval()
    if not isinstance(model, TaskPathNet):
        raise SystemExit(f"{run_dir} is a {cfg.strategy} run: the gated benchmarks time networks of per-task paths "
                         "(ccgn, hat)")
    spec = ModelSpec(cfg.backbone, cfg.width, data.spec.input_shape, cfg.setting, data.task_classes)
    test = data.benchmark.test_stream[0].dataset
    return cfg, spec, model, torch.stack([test[i % len(test)][0] for i in range(images)])


# The inference benchmarks' backbones: their width (4 where a benchmark is `tiny`) and input.
GATED_BACKBONES = {"small_cnn": (32, (1, 28, 28)), "resnet18": (16, (3, 32, 32))}
TINY_WIDTH = 4


def gated_network(backbone: str, width: int, gates: str, setting: str, trained_on: str | None = None,
                  allowed: float = RANDOM_GATED_ALLOWED,
                  images: int = BENCHMARK_IMAGES) -> tuple[ModelSpec, TaskPathNet, torch.Tensor]:
    """ccgn's network on `backbone`: its spec, the network and `images` inputs. `gates`
    "trained": the small CNN trained on `trained_on` (`trained_gated_model`), with test
    images of the first task; "random": `random_gated_model` (each task `allowed` that
    share of every layer's kernels), with random inputs."""
    torch.manual_seed(0)
    if gates == "trained":
        with tempfile.TemporaryDirectory() as folder:
            return trained_gated_model(trained_on, setting, width, folder, images)
    shape = GATED_BACKBONES[backbone][1]
    spec = ModelSpec(backbone, width, shape, setting, [[2 * k, 2 * k + 1] for k in range(RANDOM_GATED_TASKS)])
    return spec, random_gated_model(spec, allowed), torch.randn(images, *shape)


class GatedNetwork(NamedTuple):
    """A network the inference benchmarks time, and what its rows say of it: `gates`
    "trained" or "random", and for trained ones the scenario and epochs per task
    (`trained_on`)."""

    backbone: str
    width: int
    gates: str
    trained_on: str
    setting: str
    spec: ModelSpec
    model: TaskPathNet
    images: torch.Tensor


def benchmark_parser(script: str, doc: str, tiny: str, rounds: int | None = None, repeats: int | None = None,
                     repeats_help: str = "calls per round and variant") -> argparse.ArgumentParser:
    """A benchmark script's parser (`script` its `__file__`, `doc` its docstring, whose
    first paragraph describes it), with the options the scripts share: `--rounds` and
    `--repeats` where it times interleaved rounds, `--threads`, `--tiny` (a check in
    seconds, the tests' run: `tiny` says what it runs) and `--output`, by default
    `results/<script's name>.csv` beside the script."""
    path = Path(script)
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if rounds is not None:
        parser.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds [%(default)s]")
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats, help=f"{repeats_help} [%(default)s]")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads [%(default)s]")
    parser.add_argument("--tiny", action="store_true", help=f"{tiny}: a check in seconds")
    parser.add_argument("--output", type=Path, default=path.parent / "results" / f"{path.stem}.csv",
                        help="CSV to write [%(default)s]")
    return parser


def add_network_options(parser: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that time `gated_networks`: `--trained-on`,
    `--resnet-width`, `--runs`."""
    parser.add_argument("--trained-on", default="split_mnist_mini",
                        help="scenario on which ccgn's small CNN is trained [%(default)s]")
    parser.add_argument("--resnet-width", type=positive_width,
                        help=f"width of the ResNet-18 with random gates [{GATED_BACKBONES['resnet18'][0]}, "
                             f"{TINY_WIDTH} with --tiny; the papers' is 64]")
    parser.add_argument("--runs", type=Path, nargs="+", default=[], metavar="RUN_DIR",
                        help="time the networks of these finished runs (kept with --keep-checkpoints) instead")


def share(text: str) -> float:
    """An option's share of something, above 0 and at most 1 (argparse's `type`)."""
    try:
        if 0 < (value := float(text)) <= 1:
            return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not a share: give a number above 0 and at most 1")


def positive_width(text: str) -> int:
    """An option's network width, a whole number of at least 1 (argparse's `type`)."""
    if text.isdecimal() and int(text) >= 1:  # isdigit would pass "²", which int() refuses
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a width: give a whole number of at least 1")


def gated_networks(options: argparse.Namespace, images: int = BENCHMARK_IMAGES,
                   allowed: float = RANDOM_GATED_ALLOWED) -> Iterator[GatedNetwork]:
    """The gated networks the inference benchmarks time, as `add_network_options` and
    `--tiny` name them, each with `images` inputs: ccgn's small CNN of width 32 trained on
    `--trained-on` (1 epoch per task) and with random gates (`random_gated_model`, each
    task `allowed` that share of every layer's kernels), and ResNet-18 of `--resnet-width`
    with random gates (width 4 each where `--tiny`), in the task and class settings; or
    instead, with `--runs`, the networks those finished runs trained (`trained_network`)."""
    for run_dir in options.runs:
        cfg, spec, model, inputs = trained_network(run_dir, images)
        yield GatedNetwork(cfg.backbone, cfg.width, "trained", f"{cfg.scenario}, epochs {cfg.epochs}", cfg.setting,
                           spec, model, inputs)
    if options.runs:
        return
    widths = {backbone: TINY_WIDTH if options.tiny else width for backbone, (width, _) in GATED_BACKBONES.items()}
    if options.resnet_width is not None:
        widths["resnet18"] = options.resnet_width
    for backbone, gates, setting in product(GATED_BACKBONES, ("trained", "random"), ("task", "class")):
        if gates == "trained" and backbone != "small_cnn":
            continue
        trained = f"{options.trained_on}, epochs {RunConfig().epochs}" if gates == "trained" else ""
        yield GatedNetwork(backbone, widths[backbone], gates, trained, setting,
                           *gated_network(backbone, widths[backbone], gates, setting, options.trained_on, allowed,
                                          images))

"""Throughput (images per second) on the first task of an image scenario, with decoded
images cached (clbench's default) and with every image decoded from its file on access
(--no-cache): a training epoch (naive strategy) and a pass of the data loader alone
(decoding and transforms). Measured in this one process, alternating the two variants
`--repeats` times; the best of each is reported (the machine is shared and noisy).

Usage: python benchmarks/image_cache.py --data-root ../shared/data [--scenario split_cifar10_jpeg]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from functools import partial
from importlib import metadata

import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from clbench.datasets.scenarios import build_scenario

from clbench.models import ModelSpec, build_model


def epoch_throughput(scenario, backbone: str, width: int) -> float:
    torch.manual_seed(0)
    model = build_model(ModelSpec(backbone, width, scenario.spec.input_shape, "class", scenario.task_classes))
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                     train_mb_size=32, train_epochs=1, evaluator=partial(EvaluationPlugin, loggers=[]))
    experience = scenario.benchmark.train_stream[0]
    start = time.perf_counter()
    strategy.train(experience)
    return len(experience.dataset) / (time.perf_counter() - start)


def loader_throughput(scenario) -> float:
    dataset = scenario.benchmark.train_stream[0].dataset.train()
    start = time.perf_counter()
    for _ in torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True):
        pass
    return len(dataset) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--scenario", default="split_cifar10_jpeg")
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CLBENCH_CACHE"] = cache  # a cold cache: its first fill is timed too
        start = time.perf_counter()
        cached = build_scenario(args.scenario, "class", args.data_root, cache=True)
        fill = time.perf_counter() - start
        lazy = build_scenario(args.scenario, "class", args.data_root, cache=False)
        variants = {"cached": cached, "decoded_per_access": lazy}
        epoch = {name: [] for name in variants}
        loader = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, scenario in variants.items():
                loader[name].append(loader_throughput(scenario))
                epoch[name].append(epoch_throughput(scenario, args.backbone, args.width))
    report = {
        "scenario": args.scenario, "source": cached.source, "backbone": args.backbone, "width": args.width,
        "training_epoch_images_per_s": {k: round(max(v), 1) for k, v in epoch.items()},
        "data_loader_images_per_s": {k: round(max(v), 1) for k, v in loader.items()},
        "speedup_training": round(max(epoch["cached"]) / max(epoch["decoded_per_access"]), 2),
        "speedup_loader": round(max(loader["cached"]) / max(loader["decoded_per_access"]), 2),
        "cache_fill_s (unpack + decode all, once)": round(fill, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "versions": {name: metadata.version(name) for name in ("torch", "torchvision", "avalanche-lib", "pillow")},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Do a trained gated model's compact paths (`clbench.compact`, what clbench evaluates
with) predict what its masked layers predict? Loads the final checkpoint of a ccgn or HAT
run (`clbench run ... --keep-checkpoints`), runs every task's test set (batches of 256)
through the compact paths computing each sample's open channels (`per_sample`, clbench's
default at that batch size on the small CNN), through those computing one set of channels
per batch (`compact`, ResNet-18's default), in the class setting through every learned task's path run as one
(`stacked`, clbench's default on small batches: `TaskPathNet.stacked_path`) and through the masked layers, and
prints per task the accuracy each way, and for each compact
execution the test samples whose prediction differs from the masked layers', those whose
MACs counted differ (a gate whose logit is within float rounding of 0 can decide
differently), and the largest MAC difference.

    python scripts/compact_agreement.py results/compact_execution/split_mnist/task/ccgn/seed0
"""

import argparse
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from clbench.runner import load_checkpointed_run


BATCH = 256
# Settings of the network, and from which batch its backbone computes each sample's channels.
EXECUTIONS = {"per_sample": (dict(compact_inference=True, per_sample_channels=True, stacked_paths_max_batch=0), 1),
              "compact": (dict(compact_inference=True, per_sample_channels=False, stacked_paths_max_batch=0), None),
              # the class setting's only
              "stacked": (dict(compact_inference=True, stacked_paths_max_batch=BATCH, stacked_layer_macs=math.inf), None),
              "masked": (dict(compact_inference=False), None)}


@torch.no_grad()
def predictions(model, dataset, execution: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predicted classes, true classes and MACs per sample of `dataset`."""
    settings, model.backbone.per_sample_from_batch = EXECUTIONS[execution]
    for attribute, value in settings.items():
        setattr(model, attribute, value)
    predicted, true, macs = [], [], []
    for x, y, t in DataLoader(dataset, batch_size=BATCH):
        logits, sample_macs = model.forward_with_macs(x, t)
        predicted.append(logits.argmax(1))
        true.append(y)
        macs.append(sample_macs)
    return torch.cat(predicted), torch.cat(true), torch.cat(macs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    run_dir = parser.parse_args(argv).run_dir
    _, scenario, state = load_checkpointed_run(run_dir)
    model = state["trainer"].model.eval()
    executions = [name for name in EXECUTIONS if name != "stacked" or model.setting == "class"]
    compared = [name for name in executions if name != "masked"]
    print("| task | test samples | " + " | ".join(f"accuracy, {name}" for name in executions) + " | "
          + " | ".join(f"{name}: predictions differing | MACs differing | largest MAC difference" for name in compared)
          + " |")
    print("|---" * (2 + len(executions) + 3 * len(compared)) + "|")
    for task, experience in enumerate(scenario.benchmark.test_stream):
        dataset = experience.dataset.eval()
        runs = {name: predictions(model, dataset, name) for name in executions}
        masked, true, masked_macs = runs["masked"]
        cells = [str(task + 1), str(len(true))] + [f"{(predicted == true).float().mean():.4f}"
                                                   for predicted, _, _ in runs.values()]
        for name in compared:
            predicted, _, macs = runs[name]
            cells += [str(int((predicted != masked).sum())), str(int((macs != masked_macs).sum())),
                      str(int((macs - masked_macs).abs().max()))]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

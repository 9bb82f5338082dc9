"""Do a trained gated model's compact paths (`clbench.compact`, what clbench evaluates
with) predict what its masked layers predict? Loads the final checkpoint of a ccgn or HAT
run (`clbench run ... --keep-checkpoints`), runs every task's test set through both, and
prints per task the accuracy each way, the test samples whose prediction differs, those
whose MACs counted differ (a gate whose logit is within float rounding of 0 can decide
differently), and the largest MAC difference.

    python scripts/compact_agreement.py results/compact_execution/split_mnist/task/ccgn/seed0
"""

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from clbench.runner import load_checkpointed_run


@torch.no_grad()
def predictions(model, dataset, compact: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predicted classes, true classes and MACs per sample of `dataset`."""
    model.compact_inference = compact
    predicted, true, macs = [], [], []
    for x, y, t in DataLoader(dataset, batch_size=256):
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
    print("| task | test samples | accuracy, compact | accuracy, masked | predictions differing | MACs differing "
          "| largest MAC difference |")
    print("|---|---|---|---|---|---|---|")
    for task, experience in enumerate(scenario.benchmark.test_stream):
        dataset = experience.dataset.eval()
        compact, true, compact_macs = predictions(model, dataset, True)
        masked, _, masked_macs = predictions(model, dataset, False)
        print(f"| {task + 1} | {len(true)} | {(compact == true).float().mean():.4f} | {(masked == true).float().mean():.4f} "
              f"| {int((compact != masked).sum())} | {int((compact_macs != masked_macs).sum())} "
              f"| {int((compact_macs - masked_macs).abs().max())} |")


if __name__ == "__main__":
    main()

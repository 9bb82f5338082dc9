"""Does learned-threshold pruning leave ccgn's next task kernels to learn with? ccgn
re-initialises the kernels no learned task froze before each task, while ltp's per-layer
thresholds stay where the tasks so far raised them. Loads the checkpoint of a ccgn run
with `--module ltp` (after its last finished task: a run still going, or one kept with
`--keep-checkpoints`) and prints per pruned layer: its threshold (in the layer's mean
squared weight at attachment, `modules/ltp.py`), the kernels frozen and the share of
their weights kept, and for a fresh initialisation of the free kernels, what the next
task starts from: the share of weights the threshold prunes, and their mean soft mask,
which is also the share of the task loss's gradient that reaches them (dv/dw = mask).

    python scripts/ltp_free_kernels.py RUN_DIR
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from clbench.modules import ltp
from clbench.path_network import TaskPathNet
from clbench.runner import load_checkpointed_run


@torch.no_grad()
def layer_table(model: TaskPathNet) -> list[dict]:
    """One row per soft-thresholded layer of `model` (a projection shortcut's after its
    layer's), its free kernels given a fresh initialisation as ccgn gives them."""
    fresh = copy.deepcopy(model)
    for path_layer in fresh.path_layers:
        path_layer.reinitialise_free_kernels()
    names = {id(path_layer): name for name, path_layer in model.named_path_layers().items()}
    rows = []
    for (path_layer, layer), (_, fresh_layer) in zip(ltp.path_layer_weights(model), ltp.path_layer_weights(fresh)):
        soft, frozen = layer.parametrizations.weight[0], path_layer.frozen
        weight, new = layer.parametrizations.weight.original, fresh_layer.parametrizations.weight.original
        rows.append({"layer": names[id(path_layer)] + ("" if layer is path_layer.layer else ".shortcut"),
                     "threshold": soft.threshold.item(), "frozen": int(frozen.sum()), "kernels": len(frozen),
                     "frozen_kept": soft.kept(weight)[frozen].float().mean().item() if frozen.any() else None,
                     "fresh_pruned": 1 - soft.kept(new)[~frozen].float().mean().item() if (~frozen).any() else None,
                     "fresh_mask": soft.mask(new)[~frozen].mean().item() if (~frozen).any() else None})
    return rows


def share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    _, _, state = load_checkpointed_run(args.run_dir)
    model = state["trainer"].model
    if not isinstance(model, TaskPathNet) or not hasattr(model.path_layers[0].layer, "parametrizations"):
        raise SystemExit(f"{args.run_dir} is not a run of ccgn with --module ltp")
    print(f"after task {len(state['progress']['after_each_task'])}")
    print("| layer | threshold | kernels frozen | their weights kept | fresh weights pruned | fresh mean soft mask |")
    print("|---|---|---|---|---|---|")
    for row in layer_table(model):
        print(f"| {row['layer']} | {row['threshold']:.3f} | {row['frozen']} of {row['kernels']} | "
              f"{share(row['frozen_kept'])} | {share(row['fresh_pruned'])} | {share(row['fresh_mask'])} |")


if __name__ == "__main__":
    main()

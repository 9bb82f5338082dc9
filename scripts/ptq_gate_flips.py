"""How much of a quantised gated model's accuracy loss comes from its gates deciding
differently? Loads the final checkpoint of a ccgn or HAT run (`clbench run ...
--keep-checkpoints`), quantises it as the ptq module does after the last task (calibrated
on the last task's training data), and prints per variant and task: the float and the
quantised accuracy, the quantised accuracy with every mask forced to the float model's
(the quantised layers computing the float model's paths), and the share of per-sample
gate decisions (mask above one half or not) that quantisation flipped, over all layers
and in the layer where most flip.

    python scripts/ptq_gate_flips.py RUN_DIR --bits 4
"""

import argparse
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from clbench.registry import build_modules
from clbench.runner import load_checkpointed_run


@contextmanager
def masks_forced(model, masks: list[torch.Tensor]):
    """`model`'s masked layers use `masks` (one per layer, batch x units) instead of their own."""
    for layer, mask in zip(model.path_layers, masks):
        layer.mask = lambda x, task, trace, mask=mask: mask
    try:
        yield
    finally:
        for layer in model.path_layers:
            del layer.mask


@torch.no_grad()
def compare(model, quantised, dataset, task: int) -> dict:
    """Task `task`'s masked path on `dataset`: correct predictions of the float model, the
    quantised one and the quantised one with the float masks, and per layer the gate
    decisions quantisation flipped (samples x units, 1 where flipped)."""
    correct = {"float": 0, "quantised": 0, "forced": 0}
    flipped = []
    for x, y, _ in DataLoader(dataset, batch_size=256):
        float_logits, float_trace = model.forward_path(x, task)
        quantised_logits, quantised_trace = quantised.forward_path(x, task)
        with masks_forced(quantised, float_trace.masks):
            forced_logits, _ = quantised.forward_path(x, task)
        for key, logits in (("float", float_logits), ("quantised", quantised_logits), ("forced", forced_logits)):
            correct[key] += int((logits.argmax(1) == y).sum())
        flipped.append([((f > 0.5) != (q > 0.5)).float() for f, q in zip(float_trace.masks, quantised_trace.masks)])
    return {"accuracy": {key: count / len(dataset) for key, count in correct.items()},
            "flipped": [torch.cat(layer) for layer in zip(*flipped)]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--bits", type=int, nargs="+", default=[4])
    args = parser.parse_args(argv)
    _, scenario, state = load_checkpointed_run(args.run_dir)
    model = state["trainer"].model.eval()
    if not hasattr(model, "path_layers"):
        raise SystemExit(f"{args.run_dir} is not a run of a gated strategy (ccgn, HAT)")
    ptq, = build_modules([{"name": "ptq", "bits": args.bits}])
    calibration = scenario.benchmark.train_stream[scenario.n_tasks - 1].dataset.eval()
    variants = ptq.variants(model, calibration, scenario.n_tasks)
    names = list(model.named_path_layers())
    print("| variant | task | accuracy, float | accuracy, quantised | accuracy, quantised with the float gates "
          "| gate decisions flipped | layer flipping most (share) |")
    print("|---|---|---|---|---|---|---|")
    for name, variant in variants.items():
        for task, experience in enumerate(scenario.benchmark.test_stream):
            measured = compare(model, variant.model, experience.dataset.eval(), task)
            accuracy, flipped = measured["accuracy"], measured["flipped"]
            share = sum(f.sum() for f in flipped) / sum(f.numel() for f in flipped)
            worst = max(range(len(flipped)), key=lambda i: flipped[i].mean())
            print(f"| {name} | {task + 1} | {accuracy['float']:.4f} | {accuracy['quantised']:.4f} "
                  f"| {accuracy['forced']:.4f} | {share:.4f} | {names[worst]} ({flipped[worst].mean():.3f}) |")


if __name__ == "__main__":
    main()

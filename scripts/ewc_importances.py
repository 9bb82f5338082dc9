"""How large are an EWC run's importances, and can its optimiser stay stable under its
penalty? Loads the checkpoint of an EWC run (after its last finished task: a run still
going, or one kept with `--keep-checkpoints`) and prints, for the parameter tensors with
the largest importance, the largest and mean importance F, and for the largest the
penalty's curvature times the learning rate, lr * 2 * lambda * F. Avalanche's penalty is
lambda * sum F (theta - theta*)^2 with one term per learned task (mode separate), so F
here is the tasks' importances summed; in mode online, the latest (the decayed sum).
SGD with momentum m on that quadratic alone oscillates with growing amplitude once
lr * 2 * lambda * F exceeds 2 (1 + m).

    python scripts/ewc_importances.py RUN_DIR [--top 10]
"""

import argparse
from pathlib import Path

from avalanche.training.plugins import EWCPlugin

from clbench.runner import load_checkpointed_run


def importance_table(trainer, bound: float) -> list[dict]:
    """Per parameter tensor of the importances the next task's penalty weighs: name, size,
    largest and mean F, and how many of its weights have F above `bound`."""
    plugin = next((p for p in trainer.plugins if isinstance(p, EWCPlugin)), None)
    if plugin is None or not plugin.importances:
        raise SystemExit("the checkpoint holds no EWC importances: not an EWC run, or no task finished yet")
    tasks = sorted(plugin.importances) if plugin.mode == "separate" else [max(plugin.importances)]
    summed = {}
    for task in tasks:
        for name, imp in plugin.importances[task].items():
            summed[name] = summed[name] + imp.data if name in summed else imp.data
    return [{"parameter": name, "size": f.numel(), "max": f.max().item(), "mean": f.mean().item(),
             "above": int((f > bound).sum())}
            for name, f in summed.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--top", type=int, default=10, help="parameter tensors shown [%(default)s]")
    args = parser.parse_args(argv)
    cfg, _, state = load_checkpointed_run(args.run_dir)
    trainer = state["trainer"]
    step, limit = 2 * cfg.lr * cfg.hparams["ewc_lambda"], 2 * (1 + cfg.momentum)
    rows = sorted(importance_table(trainer, limit / step if step else float("inf")), key=lambda row: row["max"], reverse=True)
    print(f"after task {len(state['progress']['after_each_task'])}; lr {cfg.lr}, momentum {cfg.momentum}, "
          f"lambda {cfg.hparams['ewc_lambda']}: unstable where lr * 2 * lambda * F > {limit:.1f}")
    print("| parameter | size | largest F | mean F | lr * 2 * lambda * largest F |")
    print("|---|---|---|---|---|")
    for row in rows[: args.top]:
        print(f"| {row['parameter']} | {row['size']} | {row['max']:.3g} | {row['mean']:.3g} | {step * row['max']:.3g} |")
    print(f"weights above the limit: {sum(row['above'] for row in rows)} of {sum(row['size'] for row in rows)}")


if __name__ == "__main__":
    main()

"""Compact execution (`clbench/compact.py`) of this checkout against that of another
commit, in one process: ccgn's network with random gates (`random_gated_model`, as in
benchmarks/gated_inference.py), task setting (one task's path) and class setting (every
path and the task classifier), batch 1 and 64, the small CNN (Split MNIST's input) and
ResNet-18 of width 16 (CIFAR's). The two versions alternate for `--rounds` rounds of
`--repeats` passes; best and median per pass, and this checkout's best time over the
other's. Both must give the same MACs per sample and outputs within float tolerance
(checked; a version that computes something else is an error, not a row).

Usage: python benchmarks/compact_revisions.py [--against HEAD] [--threads 1] [--tiny]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import time
import types
from itertools import product
from pathlib import Path

import torch

from clbench import compact
from clbench.benchmarking import (RANDOM_GATED_TASKS, machine_columns, random_gated_model, torch_threads,
                                  write_csv)
from clbench.models import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "compact_revisions.csv"
COLUMNS = ["backbone", "width", "setting", "batch", "against", "best_ms_against", "best_ms_here",
           "median_ms_against", "median_ms_here", "ratio_best", "macs_per_sample", "rounds", "repeats", "machine",
           "cores", "torch_threads", "python", "torch", "avalanche", "clbench_commit"]
NETWORKS = [("small_cnn", 32, (1, 28, 28)), ("resnet18", 16, (3, 32, 32))]


def compact_at(revision: str) -> tuple[types.ModuleType, str]:
    """`clbench/compact.py` as committed at `revision`, imported as a module of its own,
    and the commit's hash."""
    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"cannot read clbench/compact.py at {revision!r}: {done.stderr.strip()}")
        return done.stdout

    commit = git("rev-parse", "--verify", f"{revision}^{{commit}}").strip()
    module = types.ModuleType(f"compact_at_{commit}")
    exec(compile(git("show", f"{commit}:clbench/compact.py"), f"{commit}:clbench/compact.py", "exec"), module.__dict__)
    return module, commit


def time_both(passes: dict, rounds: int, repeats: int) -> dict[str, list[float]]:
    times = {name: [] for name in passes}
    for _ in range(rounds):
        for name, run_pass in passes.items():
            start = time.perf_counter()
            for _ in range(repeats):
                run_pass()
            times[name].append((time.perf_counter() - start) / repeats)
    return times


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="HEAD", help="the commit to compare with [%(default)s]")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=20, help="passes per round at batch 1 (a tenth at 64)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads [%(default)s]")
    parser.add_argument("--tiny", action="store_true", help="2 rounds of 1 pass, width 4: a check in seconds")
    parser.add_argument("--output", type=Path, default=RESULTS, help="CSV to write [default: %(default)s]")
    args = parser.parse_args(argv)
    other, commit = compact_at(args.against)
    rounds = 2 if args.tiny else args.rounds
    rows = []
    with torch_threads(args.threads), torch.no_grad():
        machine = machine_columns()
        for (backbone, width, shape), setting in product(NETWORKS, ("task", "class")):
            width = 4 if args.tiny else width
            torch.manual_seed(0)
            classes = [[2 * k, 2 * k + 1] for k in range(RANDOM_GATED_TASKS)]
            here = random_gated_model(ModelSpec(backbone, width, shape, setting, classes))
            against = copy.deepcopy(here)
            against._compact_paths = {task: other.CompactPath(against, task) for task in range(RANDOM_GATED_TASKS)}
            for batch in (1, 64):
                x, t = torch.randn(batch, *shape), torch.zeros(batch, dtype=torch.long)
                (out_here, macs_here), (out_against, macs_against) = (m.forward_with_macs(x, t) for m in (here, against))
                if not (torch.equal(macs_here, macs_against) and torch.allclose(out_here, out_against, atol=1e-4)):
                    raise SystemExit(f"{backbone} {setting} batch {batch}: this checkout's compact paths compute "
                                     f"other outputs or MACs than those at {commit}")
                assert all(type(p) is compact.CompactPath for p in here._compact_paths.values()) and \
                    all(type(p) is other.CompactPath for p in against._compact_paths.values())
                repeats = 1 if args.tiny else max(1, args.repeats // (10 if batch > 1 else 1))
                times = time_both({"against": lambda: against.forward_with_macs(x, t),
                                   "here": lambda: here.forward_with_macs(x, t)}, rounds, repeats)
                best = {name: min(measured) for name, measured in times.items()}
                rows.append({"backbone": backbone, "width": width, "setting": setting, "batch": batch,
                             "against": commit,
                             **{f"best_ms_{name}": round(1e3 * value, 3) for name, value in best.items()},
                             **{f"median_ms_{name}": round(1e3 * statistics.median(measured), 3)
                                for name, measured in times.items()},
                             "ratio_best": round(best["here"] / best["against"], 3),
                             "macs_per_sample": macs_here.float().mean().item(), "rounds": rounds,
                             "repeats": repeats, **machine})
    for row in rows:
        print(f"{row['backbone']:<9} {row['width']:>2} {row['setting']:<5} batch {row['batch']:>2}: "
              f"{row['best_ms_against']:8.3f} ms at {commit[:7]}, {row['best_ms_here']:8.3f} here, "
              f"ratio {row['ratio_best']:.3f}")
    print(f"machine: {machine['machine']}, {machine['cores']} cores, torch threads {machine['torch_threads']}, "
          f"torch {machine['torch']}")
    write_csv(rows, COLUMNS, args.output)
    return rows


if __name__ == "__main__":
    main()

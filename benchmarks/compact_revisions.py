"""Compact execution (`clbench/compact.py`) of this checkout against that of another
commit, in one process, on the networks of benchmarks/gated_inference.py
(`clbench.benchmarking.gated_networks`: ccgn's small CNN trained on the embedded Split
MNIST and with random gates, ResNet-18 of width 16 with random gates; or instead, with
`--runs`, the networks of finished runs whose checkpoints were kept), task setting (one
task's path) and class setting (every path and the task classifier), at each of `--batches`;
with `--per-sample-from-batch N`, both compute each sample's channels from a batch of N
(the backbone's `per_sample_from_batch`, which ResNet-18 leaves None: never).
The two versions alternate for `--rounds` rounds of `--repeats` passes; best and median
per pass, and this checkout's best time over the other's. The other commit's module
stands in for clbench.compact while its network runs. Both must give the same MACs per
sample and outputs within float tolerance (checked; a version that computes something
else is an error, not a row).

Usage: python benchmarks/compact_revisions.py [--against HEAD] [--batches 1 64] [--per-sample-from-batch N]
                                             [--threads 1] [--tiny] [--runs RUN_DIR ...]
"""

from __future__ import annotations

import copy
import statistics
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import torch

from clbench import compact
from clbench.benchmarking import (add_network_options, benchmark_parser, gated_networks, interleaved_times,
                                  machine_columns, machine_line, torch_threads, write_csv)

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["backbone", "width", "gates", "trained_on", "setting", "batch", "against", "best_ms_against", "best_ms_here",
           "median_ms_against", "median_ms_here", "ratio_best", "macs_per_sample", "rounds", "repeats", "machine",
           "cores", "torch_threads", "python", "torch", "avalanche", "clbench_commit"]


def compact_at(revision: str) -> tuple[types.ModuleType, str]:
    """`clbench/compact.py` as committed at `revision`, imported as a module of its own,
    and the commit's hash."""
    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"cannot read clbench/compact.py at {revision!r}: {done.stderr.strip()}")
        return done.stdout

    commit = git("rev-parse", "--verify", f"{revision}^{{commit}}").strip()
    module = sys.modules[f"compact_at_{commit}"] = types.ModuleType(f"compact_at_{commit}")  # dataclasses look it up
    exec(compile(git("show", f"{commit}:clbench/compact.py"), f"{commit}:clbench/compact.py", "exec"), module.__dict__)
    if not hasattr(module, "keeps_any"):
        raise SystemExit(f"clbench/compact.py at {revision!r} cuts a path for one task, which the masked layers of "
                         "this checkout no longer take; compare with a commit that cuts paths for several tasks")
    return module, commit


@contextmanager
def imported_as_compact(module: types.ModuleType):
    """`module` in the place of clbench.compact, which `TaskPathNet` imports where it uses it."""
    here = sys.modules["clbench.compact"]
    sys.modules["clbench.compact"] = module
    try:
        yield
    finally:
        sys.modules["clbench.compact"] = here


def main(argv: list[str] | None = None) -> list[dict]:
    parser = benchmark_parser(__file__, __doc__, "2 rounds of 1 pass, width 4", rounds=9, repeats=20,
                              repeats_help="passes per round at batch 1 (a tenth at larger batches)")
    parser.add_argument("--against", default="HEAD", help="the commit to compare with [%(default)s]")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--per-sample-from-batch", type=int, metavar="N",
                        help="compute each sample's channels from a batch of N [the backbone's default]")
    add_network_options(parser)
    args = parser.parse_args(argv)
    other, commit = compact_at(args.against)
    rounds = 2 if args.tiny else args.rounds
    rows = []
    with torch_threads(args.threads):
        machine = machine_columns()
        networks = gated_networks(args, max(args.batches))
        for backbone, width, gates, trained_on, setting, _, here, images in networks:
            if args.per_sample_from_batch is not None:
                here.backbone.per_sample_from_batch = args.per_sample_from_batch
            against = copy.deepcopy(here)

            def run_against(x, t, against=against):
                with imported_as_compact(other):
                    return against.forward_with_macs(x, t)

            with torch.no_grad():  # the trained networks train outside it
                for batch in args.batches:
                    x, t = images[:batch], torch.zeros(batch, dtype=torch.long)
                    (out_here, macs_here), (out_against, macs_against) = here.forward_with_macs(x, t), run_against(x, t)
                    if not (torch.equal(macs_here, macs_against) and torch.allclose(out_here, out_against, atol=1e-4)):
                        raise SystemExit(f"{backbone} {gates} {setting} batch {batch}: this checkout's compact "
                                         f"paths compute other outputs or MACs than those at {commit}")
                    assert all(type(p) is compact.CompactPath for p in here._compact_paths.values()) and \
                        all(type(p) is other.CompactPath for p in against._compact_paths.values())
                    repeats = 1 if args.tiny else max(1, args.repeats // (10 if batch > 1 else 1))
                    times = interleaved_times({"against": lambda: run_against(x, t),
                                       "here": lambda: here.forward_with_macs(x, t)}, rounds, repeats)
                    best = {name: min(measured) for name, measured in times.items()}
                    rows.append({"backbone": backbone, "width": width, "gates": gates, "trained_on": trained_on,
                                 "setting": setting, "batch": batch, "against": commit,
                                 **{f"best_ms_{name}": round(1e3 * value, 3) for name, value in best.items()},
                                 **{f"median_ms_{name}": round(1e3 * statistics.median(measured), 3)
                                    for name, measured in times.items()},
                                 "ratio_best": round(best["here"] / best["against"], 3),
                                 "macs_per_sample": macs_here.float().mean().item(), "rounds": rounds,
                                 "repeats": repeats, **machine})
    for row in rows:
        print(f"{row['backbone']:<9} {row['width']:>2} {row['gates']:<7} {row['setting']:<5} batch {row['batch']:>2}: "
              f"{row['best_ms_against']:8.3f} ms at {commit[:7]}, {row['best_ms_here']:8.3f} here, "
              f"ratio {row['ratio_best']:.3f}")
    print(machine_line(machine))
    write_csv(rows, COLUMNS, args.output)
    return rows


if __name__ == "__main__":
    main()

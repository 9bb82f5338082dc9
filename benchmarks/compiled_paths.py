"""What fusing a compact path's small operations buys. ccgn's network with random gates
(`clbench.benchmarking.random_gated_model`: 5 tasks, each allowed a random quarter of
every layer's kernels, on random inputs), the small CNN of width 32 or ResNet-18 of width
16, or with `--trained-on SCENARIO` the small CNN as ccgn learns it there
(`trained_gated_model`, on its first task's test images), task and class settings, batch
1 and 64, timed four ways: the dense network and the compact paths
(`clbench.compact`), each run by PyTorch operation by operation and compiled by
torch.compile (`TaskPathNet.compile_compact`; on CPU its inductor backend fuses the gates'
small operations and the mask multiplications into generated C++ kernels). The first
pass of each compiles (its seconds are reported), then the four alternate as in
gated_inference.py. The compiled paths must give the eager paths' MACs and outputs within
float tolerance (checked; otherwise an error, not a row).

Usage: python benchmarks/compiled_paths.py [--threads 1] [--backbone resnet18 | --trained-on SCENARIO] [--tiny]
"""

from __future__ import annotations

import copy
import time

import torch

from clbench.benchmarking import (GATED_BACKBONES, TINY_WIDTH, benchmark_parser, best_and_median_ms, gated_network,
                                  interleaved_times, machine_columns, machine_line, torch_threads, write_csv)
from clbench.models import ModelSpec, build_model
from clbench.path_network import TaskPathNet

COLUMNS = ["backbone", "width", "gates", "setting", "batch", "execution", "best_ms", "median_ms", "speedup_vs_dense",
           "first_pass_s", "rounds", "repeats", "machine", "cores", "torch_threads", "python", "torch", "avalanche",
           "clbench_commit"]


def executions(spec: ModelSpec, gated: TaskPathNet, x: torch.Tensor, t: torch.Tensor) -> dict:
    """The four ways to run a batch of task 0 (task setting) or of unknown task (class)."""
    dense, fused = build_model(spec).eval(), copy.deepcopy(gated)
    dense_compiled = torch.compile(dense)
    fused.compile_compact = True
    run_dense = (lambda m: m(x, t)) if spec.setting == "task" else (lambda m: m(x))
    return {"dense": lambda: run_dense(dense), "dense_compiled": lambda: run_dense(dense_compiled),
            "compact": lambda: gated.forward_with_macs(x, t), "compact_compiled": lambda: fused.forward_with_macs(x, t)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = benchmark_parser(__file__, __doc__, "width 4, batch 1 and 4, 2 rounds of 1 pass", rounds=7, repeats=20,
                              repeats_help="passes per round at batch 1 (a tenth at 64)")
    parser.add_argument("--backbone", choices=sorted(GATED_BACKBONES), default="small_cnn")
    parser.add_argument("--trained-on", metavar="SCENARIO", help="ccgn's small CNN trained there, not random gates")
    args = parser.parse_args(argv)
    if args.trained_on and args.backbone != "small_cnn":
        parser.error("--trained-on trains ccgn's small CNN: leave out --backbone")
    width = TINY_WIDTH if args.tiny else GATED_BACKBONES[args.backbone][0]
    gates = "trained" if args.trained_on else "random"
    rounds = 2 if args.tiny else args.rounds
    rows = []
    with torch_threads(args.threads), torch.no_grad():
        machine = machine_columns()
        for setting in ("task", "class"):
            with torch.enable_grad():  # trained gates are trained first
                spec, gated, images = gated_network(args.backbone, width, gates, setting, args.trained_on)
            for batch in (1, 4) if args.tiny else (1, 64):
                torch._dynamo.reset()  # earlier networks' compiled code would count towards the recompile limit
                x, t = images[:batch], torch.zeros(batch, dtype=torch.long)
                runs, first_pass = executions(spec, gated, x, t), {}
                for name, call in runs.items():
                    start = time.perf_counter()
                    call()
                    first_pass[name] = time.perf_counter() - start
                (out, macs), (fused_out, fused_macs) = runs["compact"](), runs["compact_compiled"]()
                if not (torch.equal(macs, fused_macs) and torch.allclose(out, fused_out, atol=1e-4)):
                    raise SystemExit(f"{args.backbone} {setting} batch {batch}: the compiled compact paths compute "
                                     "other outputs or MACs than the eager ones")
                repeats = 1 if args.tiny else max(1, args.repeats // (10 if batch > 1 else 1))
                times = interleaved_times(runs, rounds, repeats)
                for name, measured in times.items():
                    rows.append({"backbone": args.backbone, "width": width,
                                 "gates": gates, "setting": setting, "batch": batch,
                                 "execution": name, **best_and_median_ms(measured),
                                 "speedup_vs_dense": round(min(times["dense"]) / min(measured), 2),
                                 "first_pass_s": round(first_pass[name], 2), "rounds": rounds, "repeats": repeats,
                                 **machine})
    for row in rows:
        print(f"{row['backbone']:<9} {row['gates']:<7} {row['setting']:<5} batch {row['batch']:>2} {row['execution']:<16} "
              f"best {row['best_ms']:9.3f} ms, median {row['median_ms']:9.3f}, "
              f"speed-up over dense {row['speedup_vs_dense']:5.2f}, first pass {row['first_pass_s']:6.2f} s")
    print(machine_line(machine))
    write_csv(rows, COLUMNS, args.output)
    return rows


if __name__ == "__main__":
    main()

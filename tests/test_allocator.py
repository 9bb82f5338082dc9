"""clbench's memory allocation: a forward pass reuses the memory the previous one freed."""

import platform
import subprocess
import sys

import pytest

from clbench import runner
from clbench.config import RunConfig

# Page faults per forward pass of the small CNN at batch 512, clbench's evaluation batch,
# whose first activation map (51 MB) glibc would map afresh on every pass by default.
PROBE = """
import resource, sys, torch
from clbench.allocator import keep_freed_memory
from clbench.models import SmallCNN
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
network, x = SmallCNN().eval(), torch.randn(512, 1, 28, 28)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
with torch.no_grad():
    for _ in range(3):
        network(x)
    before = faults()
    for _ in range(3):
        network(x)
print((faults() - before) / 3)
"""


def faults_per_pass(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="clbench changes only glibc's allocator")
def test_kept_memory_spares_each_forward_pass_its_page_faults():
    default, kept = faults_per_pass("default"), faults_per_pass("keep")
    assert default > 20 and kept < default / 10, (default, kept)


def test_a_run_keeps_the_memory_it_frees(tiny_scenario, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "keep_freed_memory", lambda: calls.append("kept"))
    runner.run(RunConfig(scenario=tiny_scenario, width=4, results_dir=str(tmp_path)))
    assert calls == ["kept"]

"""The built wheel ships clbench.strategies and clbench.datasets (from the top-level
folders) and no top-level `datasets` or `strategies` that would shadow other packages."""

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_imports_in_a_fresh_environment(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("clbench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "clbench/strategies/ewc.py" in names
    assert "clbench/datasets/__init__.py" in names
    assert "clbench/datasets/split_mnist_mini/split_mnist_mini.npz" in names
    assert not [n for n in names if n.split("/")[0] in ("datasets", "strategies")]

    # A fresh environment: the wheel installed into it, the heavy dependencies (torch,
    # Avalanche) borrowed from this one through a .pth file rather than reinstalled.
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True)
    check = ("import clbench.strategies, clbench.datasets, clbench.registry as r;"
             "print(clbench.strategies.__file__); print(clbench.datasets.__file__);"
             "print(sorted(r.load_strategies()));"
             "from clbench.datasets.scenarios import build_scenario; print(build_scenario('split_mnist_mini', 'task').n_tasks)")
    done = subprocess.run([str(python), "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    strategies_file, datasets_file, names, n_tasks = done.stdout.strip().splitlines()
    assert strategies_file.startswith(site) and datasets_file.startswith(site)
    assert "ewc" in names and n_tasks == "5"

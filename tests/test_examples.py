"""The examples run as users run them, so they cannot rot."""

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tierscope.demo import exploration

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_script_example(sample_store):
    result = subprocess.run([sys.executable, str(EXAMPLES / "explore.py"), str(sample_store)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "p column shape (4, 16)" in result.stdout
    assert "L1 hit ratio" in result.stdout


def test_notebook_example(levels_store, monkeypatch):
    monkeypatch.setenv("TIERSCOPE_EXAMPLE_STORE", str(levels_store))
    nb = nbformat.read(EXAMPLES / "explore.ipynb", as_version=4)
    NotebookClient(nb, timeout=240, kernel_name="python3",
                   resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))
    assert "L1 hits" in outputs
    assert "drawn: level 2 after" in outputs and "level 0 after" in outputs  # the explorer, coarse first
    images = [o for cell in nb.cells for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "the explorer's picture or the levels' comparison is missing"


@pytest.mark.slow
def test_demo_default_runs_end_to_end(tmp_path):
    """The README's demo command exactly as a user runs it (default shape)."""
    env = {**os.environ, "TIERSCOPE_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "tierscope.cli", "demo"], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "every one identical to xr.open_zarr" in result.stdout


def test_demo_small_runs_end_to_end(tmp_path):
    env = {**os.environ, "TIERSCOPE_CACHE": str(tmp_path)}
    args = ["demo", "--shape", "4,16,32,32", "--block", "1,8,16,16"]
    result = subprocess.run([sys.executable, "-m", "tierscope.cli", *args], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    n_views = len(exploration((4, 16, 32, 32), (1, 8, 16, 16)))
    assert f"{n_views} views, every one identical to xr.open_zarr (tol=0)" in out
    assert "variable u (x-velocity)" in out and "lower is better" in out
    assert all(f"phase {n}," in out for n in (1, 2, 3))
    l1 = next(line for line in out.splitlines() if "already decoded in its worker's memory (L1" in line)
    assert int(l1.split()[0]) > 0  # scrubbing back and moving z within a block hit L1
    assert "{'" not in out  # no raw Python dicts
    assert (tmp_path / "tierscope" / "demo" / "4x16x32x32-1x8x16x16" / "demo.png").stat().st_size > 0
    assert (tmp_path / "tierscope" / "demo" / "4x16x32x32-1x8x16x16" / "turb.zarr").exists()

"""A command-line cluster: ``dask scheduler --preload tierscope.dask.preload`` and plain ``dask worker``s,
as real subprocesses on loopback, with clients that did or did not call ``tierscope.connect``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from distributed import Client

import tierscope

def _dask(*args: str) -> list[str]:
    """The ``dask`` command of this environment (the venv's, not whatever is on PATH)."""
    return [str(Path(sys.executable).with_name("dask")), *args]


@pytest.fixture(scope="module")
def cli_cluster(tmp_path_factory):
    scheduler_file = tmp_path_factory.mktemp("cli") / "scheduler.json"
    common = ["--no-dashboard", "--host", "127.0.0.1"]
    procs = [subprocess.Popen(_dask("scheduler", "--scheduler-file", str(scheduler_file), "--port", "0",
                                    "--preload", "tierscope.dask.preload", *common),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, "the scheduler did not start"
            time.sleep(0.1)
        yaml_dir = scheduler_file.parent / "config"
        yaml_dir.mkdir()
        (yaml_dir / "tierscope.yaml").write_text("tierscope:\n  l2: 12MiB\n")
        # the workers' own configuration: an environment variable and a YAML file
        env = {**os.environ, "DASK_TIERSCOPE__L1": "20MiB", "DASK_CONFIG": str(yaml_dir)}
        for preload in ([], ["--preload", "tierscope.dask.preload"]):  # a plain worker, and one with tiers
            procs.append(subprocess.Popen(
                _dask("worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1", *preload, *common),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env))
        with Client(scheduler_file=str(scheduler_file)) as client:
            client.wait_for_workers(2, timeout=60)
        yield str(scheduler_file)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for proc in procs:
            errors = proc.stderr.read().decode(errors="replace")
            assert "KeyError: 'tierscope-prefetch'" not in errors, errors[-2000:]


def views(client: Client, url: str, reference: xr.DataArray) -> None:
    """A few new views (each one makes the scheduler plugin plan): exact values, workers still there."""
    ds = xr.open_dataset(url, engine="tierscope")
    for t in range(3):
        np.testing.assert_array_equal(ds.u.isel(time=t, z=slice(0, 8)).values,
                                      reference.isel(time=t, z=slice(0, 8)).values)
    assert len(client.scheduler_info()["workers"]) == 2


@pytest.fixture(scope="module")
def reference(sample_store):
    return xr.open_zarr(sample_store, consolidated=False).u.load()


def test_a_client_that_never_connected_gets_exact_views(cli_cluster, dataset_url, reference):
    with Client(scheduler_file=cli_cluster) as client:
        views(client, dataset_url, reference)
        stats = tierscope.stats(client)
        assert stats["scheduler"]["views"] >= 3
        # the preloaded scheduler plugin gave every worker tiers sized by the worker's own configuration
        workers = stats["workers"]
        assert len(workers) == 2 and {w["l1"]["capacity"] for w in workers.values()} == {20 << 20}
        assert {w["l2"]["capacity"] for w in workers.values()} == {12 << 20}


def test_removing_the_worker_plugin_mid_session_keeps_the_cluster(cli_cluster, dataset_url, reference):
    with Client(scheduler_file=cli_cluster) as client:
        tierscope.connect(client, l1="16MiB", l2="16MiB", prefetch="auto")
        views(client, dataset_url, reference)
        client.unregister_worker_plugin("tierscope")
        views(client, dataset_url, reference)

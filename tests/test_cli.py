"""The tierscope command as users run it."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import xarray as xr

CLI = [sys.executable, "-m", "tierscope.cli"]


def run(*args, timeout=120):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sample_then_ingest_rechunks_identically(tmp_path):
    src, out = tmp_path / "s.zarr", tmp_path / "r.zarr"
    assert run("sample", str(src), "--shape", "2,8,8,8", "--block", "1,4,4,4",
               "--variables", "u,p", "--seed", "3").returncode == 0
    result = run("ingest", str(src), str(out), "--block", "time=1,z=8,y=2,x=8")
    assert result.returncode == 0, result.stderr
    a = xr.open_zarr(src, consolidated=False)
    b = xr.open_zarr(out, consolidated=False)
    xr.testing.assert_identical(a.load(), b.load())
    assert b.u.encoding["chunks"] == (1, 8, 2, 8)


def test_errors_are_one_clear_line(tmp_path):
    result = run("serve", str(tmp_path / "missing.zarr"))
    assert result.returncode == 2
    assert "cannot open store" in result.stderr and "missing.zarr" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("ingest", str(tmp_path / "none.nc"), str(tmp_path / "o.zarr"), "--block", "1,0")
    assert result.returncode == 2 and "invalid block spec" in result.stderr
    result = run("sample", str(tmp_path / "x.zarr"), "--shape", "2,a")
    assert result.returncode == 2 and "comma-separated integers" in result.stderr


def test_serve_answers_over_http_and_stops_gracefully(sample_store):
    port = free_port()
    proc = subprocess.Popen([*CLI, "serve", str(sample_store), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == f"serving http://127.0.0.1:{port}/datasets/turb"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/datasets", timeout=5) as r:
                    assert json.load(r) == {"datasets": ["turb"]}
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        ds = xr.open_dataset(f"http://127.0.0.1:{port}/datasets/turb", engine="tierscope")
        ref = xr.open_zarr(sample_store, consolidated=False)
        np.testing.assert_array_equal(ds.u.isel(time=3, z=5).values, ref.u.isel(time=3, z=5).values)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0

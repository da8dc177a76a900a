"""The tierscope command as users run it."""

import argparse
import importlib.metadata
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


def test_serve_on_a_taken_port_is_one_line_and_prints_no_url(sample_store):
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        result = run("serve", str(sample_store), "--port", str(port))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"tierscope serve: error: cannot listen on 127.0.0.1:{port}: "
                             "Address already in use\n")


def test_version_and_python_dash_m():
    expected = f"tierscope {importlib.metadata.version('tierscope')}\n"
    assert run("--version").stdout == expected
    result = subprocess.run([sys.executable, "-m", "tierscope", "--version"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout == expected


def _actions(parser: argparse.ArgumentParser, path: str = "tierscope"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield path, action


def test_help_describes_every_argument_and_its_default():
    from tierscope.cli import build_parser

    for path, action in _actions(build_parser()):
        name = f"{path} {action.option_strings or action.metavar or action.dest}"
        assert action.help, f"{name} has no help"
        if action.default not in (None, False):
            assert "(default: " in action.help, f"{name}: help names no default"
    result = run("serve", "--help")
    assert "--port PORT           port to listen on; 0 picks a free one (default: 8765)" in result.stdout


def test_existing_output_names_the_overwrite_flag(sample_store, tmp_path):
    for command in (("sample", str(sample_store)), ("ingest", str(sample_store), str(sample_store))):
        result = run(*command)
        assert result.returncode == 2
        assert result.stderr == (f"tierscope {command[0]}: error: {sample_store} already exists; "
                                 "pass --overwrite to replace it\n")


def test_ingest_several_files_with_the_default_block_and_progress(tmp_path):
    src = tmp_path / "s.zarr"
    assert run("sample", str(src), "--shape", "6,8,16,16", "--block", "1,8,8,8", "--variables", "u",
               "--quiet").returncode == 0
    full = xr.open_zarr(src, consolidated=False)
    for i in range(3):
        full.isel(time=slice(2 * i, 2 * i + 2)).to_netcdf(tmp_path / f"part{i}.nc")
    out = tmp_path / "all.zarr"
    result = run("ingest", str(tmp_path / "part2.nc"), str(tmp_path / "part[01].nc"), str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {out}\n"
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith("tierscope ingest: 100% (") and lines[-1].endswith(" MiB)")
    ingested = xr.open_zarr(out, consolidated=False)
    xr.testing.assert_identical(ingested.load(), full.load())
    assert ingested.u.encoding["chunks"] == (1, 8, 16, 16)  # time 1, the (unchunked) rest: under 1 MiB


def test_sample_shows_progress(tmp_path):
    result = run("sample", str(tmp_path / "p.zarr"), "--shape", "20,4,4,4", "--block", "2,4,4,4")
    assert result.returncode == 0
    assert result.stderr.splitlines() == [f"tierscope sample: {p}% ({p // 5} of 20 time steps)"
                                          for p in range(10, 101, 10)]

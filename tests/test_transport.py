"""The HTTP transport over a real block server that goes away and comes back."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import xarray as xr

import tierscope
from tierscope import config
from tierscope.client import http
from tierscope.errors import ServerUnavailableError
from tierscope.server import BlockService, ServerThread
from tierscope.store.origin import ZarrOrigin


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_server_restarted_mid_session_costs_a_retry_not_an_error(sample_store):
    tierscope.connect(None, l1="64MiB", l2="64MiB")
    ref = xr.open_zarr(sample_store, consolidated=False).u
    port = free_port()
    first = ServerThread(BlockService([ZarrOrigin(sample_store)]), port=port).start()
    ds = xr.open_dataset(f"{first.url}/datasets/turb", engine="tierscope")
    np.testing.assert_array_equal(ds.u.isel(time=0, z=0).values, ref.isel(time=0, z=0).values)
    first.stop()  # the keep-alive connection the session holds is now dead
    before = http.retries()
    servers = []
    restart = threading.Timer(0.3, lambda: servers.append(
        ServerThread(BlockService([ZarrOrigin(sample_store)]), port=port).start()))
    restart.start()
    try:
        started = time.monotonic()
        np.testing.assert_array_equal(ds.u.isel(time=1, z=0).values, ref.isel(time=1, z=0).values)
        assert time.monotonic() - started < 5
        assert 1 <= http.retries() - before <= len(config.get("http.retry-delays"))
        assert tierscope.stats()["total"]["retries"] == http.retries()
    finally:
        restart.join()
        for server in servers:
            server.stop()


def test_a_server_that_stays_away_is_an_error_after_the_retries(sample_store):
    transport = http.HttpTransport(f"http://127.0.0.1:{free_port()}")
    before, started = http.retries(), time.monotonic()
    with pytest.raises(ServerUnavailableError, match="cannot reach tierscope server"):
        transport.info("turb")
    delays = config.get("http.retry-delays")
    assert http.retries() - before == len(delays)
    assert time.monotonic() - started >= sum(delays)

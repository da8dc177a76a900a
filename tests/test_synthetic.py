"""The synthetic origin: the sample's field computed on read, exact against the generator at any size."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import numpy as np
import pytest
import xarray as xr
import zarr

import tierscope
from tierscope.backend import TierscopeBackendEntrypoint
from tierscope.client.source import Source
from tierscope.store import write_sample
from tierscope.store.origin import dataset_name, detect_format, open_origin
from tierscope.store.sample import SampleVariable, sample_field
from tierscope.store.synthetic import SyntheticOrigin

VARIABLES = ("u", "v", "w", "p")


def _expected(tile_space, name, seed, step, space):
    """The generator's tile for ``step``, repeated periodically and cut to ``space`` (ranges per axis)."""
    tile = sample_field(tile_space, name, seed, step)
    return tile[np.ix_(*(np.asarray(r) % n for r, n in zip(space, tile.shape, strict=True)))]


def _whole(origin, name):
    """A variable assembled from every one of its blocks."""
    var = origin.info().variable(name)
    out = np.full(var.shape, np.nan, dtype=np.float32)
    for index in var.grid.indices():
        out[var.grid.slices(index)] = origin.read_block(name, index)
    return out


def test_small_dataset_is_bit_identical_to_write_sample(tmp_path):
    shape, block = (3, 16, 32, 32), (1, 8, 16, 16)
    store = write_sample(tmp_path / "turb.zarr", shape, block, VARIABLES, seed=3)
    group = zarr.open_group(store, mode="r")
    with closing(open_origin("sample://turb?shape=3,16,32,32&block=1,8,16,16&seed=3")) as origin:
        assert isinstance(origin, SyntheticOrigin) and origin.name == "turb"
        for name in VARIABLES:
            var = origin.info().variable(name)
            assert (var.shape, var.block, var.dtype) == (shape, block, np.float32)
            for index in var.grid.indices():
                np.testing.assert_array_equal(
                    origin.read_block(name, index), group[name].get_block_selection(index), strict=True
                )
        ref = xr.open_zarr(store, consolidated=False)
        info = origin.info()
        for dim, (values, attrs) in info.coords.items():
            np.testing.assert_array_equal(values, ref[dim].values, strict=True)
            assert attrs == ref[dim].attrs
        for name in VARIABLES:
            assert info.variables[name].attrs == ref[name].attrs
        assert info.attrs == {**ref.attrs, "origin": "synthetic", "period": 128}


def test_field_is_the_tile_repeated_periodically():
    # tile (10, 16, 16): z is below the period; y blocks of 12 straddle tile borders; x blocks exceed it
    url = "sample://per?shape=2,10,48,40&block=1,4,12,20&period=16&variables=p,u&seed=9"
    with closing(open_origin(url)) as origin:
        assert origin.tile == (10, 16, 16)
        for name in ("p", "u"):
            whole = _whole(origin, name)
            for step in range(2):
                expected = _expected((10, 16, 16), name, 9, step, (range(10), range(48), range(40)))
                np.testing.assert_array_equal(whole[step], expected, strict=True)
        # one straddling block by hand: y 12..24 wraps at 16, x 20..40 covers 4..16, 0..16, 0..8
        tile = sample_field((10, 16, 16), "u", 9, 1)
        block = origin.read_block("u", (1, 1, 1, 1))
        np.testing.assert_array_equal(block[0, :, :4], tile[4:8, 12:16][:, :, np.r_[4:16, 0:8]])
        np.testing.assert_array_equal(block[0, :, 4:], tile[4:8, 0:8][:, :, np.r_[4:16, 0:8]])


def test_blocks_are_fresh_arrays_and_a_tile_is_computed_once_for_many_readers():
    url = "sample://flight?shape=3,64,64,64&block=1,16,16,16&variables=u,v"
    with closing(open_origin(url)) as origin:
        grid = origin.info().variable("u").grid
        indices = [i for i in grid.indices() if i[0] == 2] * 2  # 128 reads of one step's 64 blocks
        with ThreadPoolExecutor(16) as pool:
            blocks = list(pool.map(lambda i: origin.read_block("u", i), indices))
        assert origin.tiles.stats.misses == 1  # one tile computation; the other readers waited or hit
        assert origin.tiles.stats.hits == len(indices) - 1
        tile = sample_field((64, 64, 64), "u", 0, 2)
        for index, block in zip(indices, blocks, strict=True):
            np.testing.assert_array_equal(block[0], tile[grid.slices(index)[1:]], strict=True)
        blocks[0][...] = 0  # the caller owns its block: the tile is untouched
        np.testing.assert_array_equal(origin.read_block("u", indices[0])[0], tile[:16, :16, :16])
        origin.read_block("v", (2, 0, 0, 0))
        assert origin.tiles.stats.misses == 2  # another variable is another tile


def test_time_blocks_of_several_steps():
    with closing(open_origin("sample://steps?shape=5,8,8,8&block=2,8,8,8&variables=w")) as origin:
        np.testing.assert_array_equal(_whole(origin, "w"), np.stack([sample_field((8, 8, 8), "w", 0, t)
                                                                      for t in range(5)]))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sample://t", "parameter 'shape' is missing"),
        ("sample://t?shape=1,4,4", "shape must have 4 entries"),
        ("sample://t?shape=1,4,x,4", "shape must be comma-separated integers"),
        ("sample://t?shape=1,0,4,4", "shape must be a non-empty sequence of positive ints"),
        ("sample://t?shape=1,4,4,4&block=1,4,4", "block must have 4 entries"),
        ("sample://t?shape=1,4,4,4&block=1,-4,4,4", "block must be a non-empty sequence of positive ints"),
        ("sample://t?shape=1,4,4,4&colour=red", "unknown parameter 'colour'"),
        ("sample://t?shape=1,4,4,4&shape=2,4,4,4", "parameter 'shape' is given twice"),
        ("sample://t?shape=1,4,4,4&period=1", "period must be an integer >= 2"),
        ("sample://t?shape=1,4,4,4&period=big", "period must be an integer"),
        ("sample://t?shape=1,4,4,4&seed=-1", "seed must be a non-negative integer"),
        ("sample://t?shape=1,4,4,4&seed=x", "seed must be an integer"),
        ("sample://t?shape=1,4,4,4&variables=u,u", "variable names must be unique"),
        ("sample://t?shape=1,4,4,4&variables=u,time", "must differ from the dimensions"),
        ("sample://?shape=1,4,4,4", "dataset name"),
        ("sample://t/more?shape=1,4,4,4", "nothing after NAME"),
    ],
)
def test_bad_urls_are_clear_value_errors(url, message):
    with pytest.raises(ValueError, match=message):
        open_origin(url)
    with pytest.raises(ValueError, match=message):
        xr.open_dataset(url, engine="tierscope")


def test_locations_route_to_the_synthetic_origin():
    url = "sample://turb?shape=10000,1024,2048,2048&block=1,64,64,64"
    assert dataset_name(url) == "turb" and detect_format(url) == "synthetic"
    assert Source.parse(url) == Source("embedded", url, "turb")  # the URL kept whole, not made a path
    assert TierscopeBackendEntrypoint().guess_can_open(url)
    with closing(open_origin(url)) as origin:
        var = origin.info().variable("u")
        assert var.grid.nblocks == (10000, 16, 32, 32)
        assert var.shape == (10000, 1024, 2048, 2048) and var.block == (1, 64, 64, 64)
        assert origin.info().dims == {"time": 10000, "z": 1024, "y": 2048, "x": 2048}
        assert origin.drop_page_cache() == 0
    with closing(open_origin("sample://tiny?shape=2,8,100,30")) as origin:  # default block, clipped
        assert origin.info().variable("p").block == (1, 8, 64, 30)


def test_open_dataset_embedded_gives_exact_values():
    url = "sample://emb?shape=4,32,64,64&block=1,16,32,32&period=32&seed=2"
    ds = xr.open_dataset(url, engine="tierscope")
    assert ds.u.shape == (4, 32, 64, 64) and ds.attrs["origin"] == "synthetic"
    np.testing.assert_array_equal(ds.time.values, np.arange(4) / 10)
    view = ds.v.isel(time=3, z=slice(10, 20), y=slice(20, 50)).values
    expected = _expected((32, 32, 32), "v", 2, 3, (range(10, 20), range(20, 50), range(64)))
    np.testing.assert_array_equal(view, expected, strict=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_a_synthetic_dataset():
    port, url = _free_port(), "sample://cli?shape=100000,256,256,256&variables=u&period=32"
    proc = subprocess.Popen([sys.executable, "-m", "tierscope.cli", "serve", url, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == f"serving http://127.0.0.1:{port}/datasets/cli"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/datasets/cli", timeout=5) as r:
                    info = json.load(r)
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert info["dims"] == {"time": 100000, "z": 256, "y": 256, "x": 256}
        assert info["variables"]["u"]["block"] == [1, 64, 64, 64]
        ds = xr.open_dataset(f"http://127.0.0.1:{port}/datasets/cli", engine="tierscope")
        view = ds.u.isel(time=99_999, z=200, x=slice(30, 40)).values
        expected = _expected((32, 32, 32), "u", 0, 99_999, (range(200, 201), range(256), range(30, 40)))
        np.testing.assert_array_equal(view, expected[0], strict=True)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    result = subprocess.run([sys.executable, "-m", "tierscope.cli", "serve", "sample://bad?shape=1,2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "shape must have 4 entries" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def big_server():
    """The issue's check: 10^4 steps of 512 x 1024 x 1024, 2.0e7 blocks of 1 MiB (21 TB), on no disk."""
    from tierscope.server import BlockService, ServerThread

    origin = open_origin("sample://big?shape=10000,512,1024,1024&block=1,64,64,64&variables=u")
    with ServerThread(BlockService([origin], l3="64MiB", l4="64MiB")) as running:
        yield running


@pytest.fixture(scope="module")
def two_workers():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


def test_ten_million_blocks_serve_exact_views_on_a_cluster(big_server, two_workers):
    tierscope.connect(two_workers, l1="256MiB", l2="256MiB")
    url = f"{big_server.url}/datasets/big"
    exact = xr.open_dataset(url, engine="tierscope", tol=0)
    assert np.prod(exact.u.encoding["chunks"]) == 64**3
    assert int(np.prod([-(-n // b) for n, b in zip(exact.u.shape, exact.u.encoding["chunks"])])) >= 10**7
    assert exact.time.values[-1] == pytest.approx(999.9)
    generator = SampleVariable((128, 128, 128), "u", 0)  # the tile: every axis is periodic with 128
    expected = generator.step(9_999)[100, 0:128, 64:128]  # z 100, y 0..128, x 960..1024 wrapped
    view = exact.u.isel(time=9_999, z=100, y=slice(0, 128), x=slice(960, 1024)).values
    np.testing.assert_array_equal(view, expected, strict=True)

    bounded = xr.open_dataset(url, engine="tierscope", tol=1e-3)
    view = bounded.u.isel(time=9_999, z=100, y=slice(0, 128), x=slice(960, 1024)).values
    assert view.shape == expected.shape and np.abs(view - expected).max() <= 1e-3
    jump = bounded.u.isel(time=4_321, z=511, y=1023, x=slice(896, 1024)).values  # far: the last corner
    assert np.abs(jump - generator.step(4_321)[127, 127, 0:128]).max() <= 1e-3

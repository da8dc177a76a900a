"""The block server's plain zarr v3 view (/zarr/NAME) read by zarr-python and xarray, no tierscope client:
every level of stored pyramids (zarr, HDF5) and of a sample:// dataset, and the OME-Zarr multiscales."""

from __future__ import annotations

import http.client
import json
import math
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
import zstandard

from tierscope.server import BlockService, ServerThread
from tierscope.server.zarr_http import CHUNK_CACHE_CONTROL, METADATA_CACHE_CONTROL
from tierscope.store import ingest, pyramid, write_sample
from tierscope.store.origin import ZarrOrigin, open_origin

SHAPE, BLOCK = (3, 9, 6, 7), (2, 4, 4, 4)  # partial blocks at every edge, at every level
LEVELS = 3  # z: 9, 5, 3 -> one block of 4 at level 2
SYNTHETIC = "sample://syn?shape=3,9,6,7&block=2,4,4,4&variables=u,w&seed=2"  # its levels: computed
LEVELED = ("turb", "turbh5", "syn")  # pyramid on zarr, ingest --levels to HDF5, sample://
TOKEN = "zarr-token"
# xarray writes <U coordinates as zarr-python's fixed_length_utf32, which warns that it has no v3 spec yet
pytestmark = pytest.mark.filterwarnings("ignore:The data type .FixedLengthUTF32")


def _cf_store(path):
    """Packed int16 with scale_factor/add_offset/_FillValue, a datetime and a text coordinate, text data."""
    data = np.arange(15, dtype=float).reshape(3, 5) / 10 + 1
    data[1, 2] = np.nan
    ds = xr.Dataset(
        {"temp": (("time", "station"), data, {"long_name": "temperature"}),
         "label": (("station",), np.array(["a", "bb", "", "dddd", "é"], dtype=object))},
        coords={"time": pd.date_range("2000-01-01", periods=3, freq="6h"),
                "station": np.array(["alpha", "beta", "gamma", "delta", "eps"])},
        attrs={"title": "cf"},
    )
    ds.to_zarr(path, zarr_format=3, consolidated=False, encoding={
        "temp": {"dtype": "int16", "scale_factor": 0.1, "add_offset": 1.0, "_FillValue": -9999,
                 "chunks": (2, 2)},
        "label": {"chunks": (2,)},
    })
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Where each served dataset is: stores written with their levels, and the sample:// URL."""
    root = tmp_path_factory.mktemp("zarrhttp")
    turb = write_sample(root / "turb.zarr", shape=SHAPE, block=BLOCK, variables=("u", "p"), seed=1)
    turbh5 = ingest(turb, root / "turbh5.h5", BLOCK, fmt="hdf5", levels=LEVELS)  # from level 0 alone
    assert pyramid(turb) == LEVELS
    return {"turb": turb, "turbh5": turbh5, "cf": _cf_store(root / "cf.zarr"), "syn": SYNTHETIC}


@pytest.fixture(scope="module")
def server(stores):
    origins = [open_origin(stores[name]) for name in ("turb", "turbh5", "cf", "syn")]
    with ServerThread(BlockService(origins, l4="64MiB")) as running:
        yield running


def request(server, method, path, headers=None, body=None):
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), body


def _open_zarr(url, **kwargs):
    return xr.open_zarr(url, **kwargs).load()


def _group(k):
    """Level k's group for ``xr.open_zarr``: the root for level 0."""
    return str(k) if k else None


def _level(group, k):
    return group[str(k)] if k else group


def _path(k, name):
    return f"{k}/{name}" if k else name


def _without_ome(ds):
    ome = ds.attrs.pop("ome")
    assert ome["version"] == "0.5"
    return ds


def test_plain_zarr_reads_every_array_as_stored(server, stores):
    remote = zarr.open_group(f"{server.url}/zarr/turb", mode="r")
    local = zarr.open_group(stores["turb"], mode="r")
    assert sorted(remote.group_keys()) == sorted(local.group_keys()) == ["1", "2"]
    for k in range(LEVELS):
        keys = sorted(_level(local, k).array_keys())
        assert sorted(_level(remote, k).array_keys()) == keys == ["p", "time", "u", "x", "y", "z"]
        for key in (_path(k, name) for name in keys):
            got, want = remote[key], local[key]
            assert (got.shape, got.chunks, got.dtype) == (want.shape, want.chunks, want.dtype), key
            assert got.metadata.dimension_names == want.metadata.dimension_names
            assert got.attrs.asdict() == want.attrs.asdict(), key  # _FillValue in xarray's zarr v3 form
            np.testing.assert_array_equal(got[:], want[:])  # every chunk, the partial edge ones included


@pytest.mark.parametrize("name", LEVELED)
def test_every_level_reads_like_tierscope_opens_it(server, stores, name):
    """Level k of /zarr/NAME, with plain zarr-python and xarray, is exactly tierscope's level k (tol=0):
    values, coordinates, attributes, and raw arrays chunked by the level's blocks."""
    url = f"{server.url}/zarr/{name}"
    group = zarr.open_group(url, mode="r")
    assert sorted(group.group_keys()) == [str(k) for k in range(1, LEVELS)]
    for k in range(LEVELS):
        remote = _open_zarr(url, group=_group(k))
        with xr.open_dataset(stores[name], engine="tierscope", level=k, tol=0) as ours:
            assert ours.encoding["tierscope_levels"] == LEVELS
            xr.testing.assert_identical(_without_ome(remote) if k == 0 else remote, ours.load())
        info = server.service.info(f"{name}@{k}" if k else name)  # what the view describes level k from
        with xr.open_dataset(stores[name], engine="tierscope", level=k, decode_cf=False) as raw:
            for var in raw.variables:
                array = group[_path(k, var)]
                assert array.metadata.dimension_names == raw[var].dims
                assert array.dtype == raw[var].dtype
                np.testing.assert_array_equal(array[:], raw[var].values)
                if var in info.variables:
                    assert array.chunks == info.variables[var].block
    assert request(server, "GET", f"/zarr/{name}/{LEVELS}/zarr.json")[0] == 404


@pytest.mark.parametrize("name", ["turb", "cf"])
def test_xarray_reads_what_the_store_gives(server, stores, name):
    remote = _without_ome(_open_zarr(f"{server.url}/zarr/{name}"))
    store = xr.open_zarr(stores[name], consolidated=False).load()
    store.attrs.pop("ome", None)  # the store's own multiscales (pixel units); the view writes its own
    xr.testing.assert_identical(remote, store)
    # tierscope's own block path serves no text data variables: compare the rest
    with xr.open_dataset(stores[name], engine="tierscope", drop_variables=["label"]) as ds:
        xr.testing.assert_identical(remote.drop_vars("label", errors="ignore"), ds.load())
    if name == "cf":  # CF decoding as from the store: packed ints, fill values, datetimes, text
        assert remote.temp.dtype == np.float64 and np.isnan(remote.temp[1, 2])
        assert remote.time.dtype.kind == "M" and remote.station.dtype == "<U5"
        assert zarr.open_group(f"{server.url}/zarr/cf", mode="r").attrs["ome"]["multiscales"] == []
        assert not list(zarr.open_group(f"{server.url}/zarr/cf", mode="r").group_keys())  # one level


@pytest.mark.parametrize("name", LEVELED)
def test_ome_multiscales_list_every_level(server, stores, name):
    multiscales = zarr.open_group(f"{server.url}/zarr/{name}", mode="r").attrs["ome"]["multiscales"]
    with xr.open_dataset(stores[name], engine="tierscope", decode_times=False) as level0:
        assert sorted(m["name"] for m in multiscales) == sorted(level0.data_vars)
        t, x = level0.time.values, level0.x.values
    assert x[1] - x[0] == pytest.approx(2 * math.pi / SHAPE[3])
    for entry in multiscales:
        assert [(a["name"], a["type"]) for a in entry["axes"]] == [
            ("time", "time"), ("z", "space"), ("y", "space"), ("x", "space")]
        assert entry["axes"][0]["unit"] == "second" and entry["axes"][3]["unit"] == "meter"
        assert [d["path"] for d in entry["datasets"]] == [_path(k, entry["name"]) for k in range(LEVELS)]
        assert entry["type"] == "mean"  # float32: levels average
        for k, dataset in enumerate(entry["datasets"]):
            scale, translation = dataset["coordinateTransformations"]
            assert (scale["type"], translation["type"]) == ("scale", "translation")
            assert scale["scale"][0] == pytest.approx(t[1] - t[0])  # time is never coarsened
            # level k's x is the mean of each 2**k level-0 values: their step and first mean
            assert scale["scale"][3] == pytest.approx(2**k * (x[1] - x[0]))
            assert translation["translation"][3] == pytest.approx(x[: 2**k].mean())


@pytest.mark.parametrize(("path", "index", "chunk_shape", "shape"), [
    ("u", (1, 2, 1, 1), BLOCK, (1, 1, 2, 3)),
    ("1/u", (1, 1, 0, 0), (2, 4, 3, 4), (1, 1, 3, 4)),  # level 1: blocks clipped to y's 3
])
def test_a_partial_edge_chunk_is_full_size_and_lossless(server, stores, path, index, chunk_shape, shape):
    key = f"/zarr/turb/{path}/c/" + "/".join(map(str, index))
    status, headers, body = request(server, "GET", key)
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    chunk = np.frombuffer(zstandard.ZstdDecompressor().decompress(body), "<f4").reshape(chunk_shape)
    block = zarr.open_group(stores["turb"], mode="r")[path].get_block_selection(index)
    assert block.shape == shape
    np.testing.assert_array_equal(chunk[tuple(slice(0, n) for n in shape)], block)
    assert np.isnan(chunk[1:]).all() and np.isnan(chunk[:, 1:]).all()  # padded with the fill value


def test_chunks_and_documents_carry_etags_and_cache_control(server):
    for path, cache in [("/zarr/turb/u/c/0/0/0/0", CHUNK_CACHE_CONTROL),
                        ("/zarr/turb/time/c/0", CHUNK_CACHE_CONTROL),
                        ("/zarr/turb/zarr.json", METADATA_CACHE_CONTROL),
                        ("/zarr/turb/u/zarr.json", METADATA_CACHE_CONTROL)]:
        status, headers, body = request(server, "GET", path)
        assert status == 200 and headers["Cache-Control"] == cache and body
        etag = headers["ETag"]
        assert request(server, "GET", path)[1]["ETag"] == etag  # stable
        status, again, empty = request(server, "GET", path, {"If-None-Match": f'"other", W/{etag}'})
        assert (status, empty, again["ETag"]) == (304, b"", etag)
        assert request(server, "GET", path, {"If-None-Match": '"other"'})[0] == 200
        status, head, empty = request(server, "HEAD", path)
        assert (status, empty, head["ETag"]) == (200, b"", etag)
    assert request(server, "GET", "/zarr/turb/u/c/0/0/0/1")[1]["ETag"] != etag
    assert request(server, "GET", "/zarr/syn/u/c/0/0/0/0")[1]["ETag"] != request(
        server, "GET", "/zarr/turb/u/c/0/0/0/0")[1]["ETag"]


def test_head_sends_no_body_on_a_kept_alive_connection(server):
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    for path in ("/zarr/turb/u/c/0/0/0/0", "/datasets/turb/blocks/u/0.0.0.0"):
        conn.request("GET", path)
        body = conn.getresponse().read()
        conn.request("HEAD", path)
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"")
        assert int(response.getheader("Content-Length")) == len(body)
        conn.request("GET", path)  # the same connection: nothing of the HEAD answer's body is left on it
        assert conn.getresponse().read() == body
    conn.close()


def test_cors_for_browsers(server):
    status, headers, _ = request(server, "OPTIONS", "/zarr/turb/u/c/0/0/0/0", {
        "Origin": "https://viewer.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "range, if-none-match"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
    assert set(headers["Access-Control-Allow-Methods"].split(", ")) == {"GET", "HEAD", "OPTIONS"}
    assert {"Range", "If-None-Match"} <= set(headers["Access-Control-Allow-Headers"].split(", "))
    for path in ("/zarr/turb/zarr.json", "/zarr/turb/u/c/0/0/0/0", "/zarr/turb/.zgroup"):
        headers = request(server, "GET", path, {"Origin": "https://viewer.example"})[1]
        assert headers["Access-Control-Allow-Origin"] == "*"
        assert "ETag" in headers["Access-Control-Expose-Headers"]


@pytest.mark.parametrize(("path", "kind", "message"), [
    ("/zarr/nope/zarr.json", "DatasetNotFoundError", "no dataset named 'nope'"),
    ("/zarr/turb@1/zarr.json", "DatasetNotFoundError", "is level 1 of 'turb': zarr readers find it at "
                                                       "/zarr/turb/1/"),
    ("/zarr/syn@2/u/c/0/0/0/0", "DatasetNotFoundError", "/zarr/syn/2/"),
    ("/zarr/turb@0/zarr.json", "DatasetNotFoundError", "find it at /zarr/turb/"),
    ("/zarr/turb/q/zarr.json", "HTTPNotFound", "no zarr key 'q/zarr.json'"),
    ("/zarr/turb/q/c/0/0/0/0", "VariableNotFoundError", "no array 'q'"),
    ("/zarr/turb/u/c/2/0/0/0", "BlockIndexError", "out of range on axis 0"),
    ("/zarr/turb/u/c/0/0/0", "BlockIndexError", "has 3 axes, expected 4"),
    ("/zarr/turb/u/c/0/0/0/0/0", "HTTPNotFound", "malformed chunk key"),
    ("/zarr/turb/u/c/0/x/0/0", "HTTPNotFound", "malformed chunk key"),
    ("/zarr/turb/u/c/0.0.0.0", "HTTPNotFound", "malformed chunk key"),
    ("/zarr/turb/time/c/1", "BlockIndexError", "out of range"),
    ("/zarr/turb/3/u/zarr.json", "HTTPNotFound", "no zarr key"),
    ("/zarr/turb/1/q/c/0/0/0/0", "VariableNotFoundError", "no array '1/q'"),
    ("/zarr/turb/1/u/c/0/2/0/0", "BlockIndexError", "out of range on axis 1"),
    ("/zarr/turb/.zgroup", "HTTPNotFound", "no zarr key"),
    ("/zarr/turb/.zattrs", "HTTPNotFound", "no zarr key"),
    ("/zarr/turb/u/.zarray", "HTTPNotFound", "no zarr key"),
    ("/zarr/turb/zarr.json/x", "HTTPNotFound", "no zarr key"),
    ("/zarr/turb", "HTTPNotFound", "is a zarr v3 group"),
])
def test_missing_keys_are_json_404s(server, path, kind, message):
    status, headers, body = request(server, "GET", path)
    payload = json.loads(body)
    assert (status, payload["type"]) == (404, kind) and message in payload["error"]
    assert headers["Access-Control-Allow-Origin"] == "*"


def test_a_chunk_read_twice_is_an_l4_hit(server):
    assert request(server, "PUT", "/config", body=b"{}")[0] == 200  # empty tiers, zero stats
    before = json.loads(request(server, "GET", "/stats")[2])
    tiers = [request(server, "GET", "/zarr/turb/p/c/1/0/1/0")[1]["X-Tierscope-Tier"] for _ in range(2)]
    after = json.loads(request(server, "GET", "/stats")[2])
    assert tiers == ["origin", "l4"]
    assert after["tiers"]["l4"]["hits"] == before["tiers"]["l4"]["hits"] + 1
    assert after["origin_reads"] == before["origin_reads"] + 1
    assert after["requests"]["user"] == before["requests"]["user"] + 2


def test_a_token_server_needs_the_header_from_zarr_clients_too(stores):
    with ServerThread(BlockService([ZarrOrigin(stores["turb"])]), token=TOKEN) as running:
        url = f"{running.url}/zarr/turb"
        status, headers, _ = request(running, "GET", "/zarr/turb/zarr.json")
        assert status == 401 and headers["Access-Control-Allow-Origin"] == "*"
        with pytest.raises(Exception, match="401"):
            zarr.open_group(url, mode="r")
        options = {"client_kwargs": {"headers": {"Authorization": f"Bearer {TOKEN}"}}}
        group = zarr.open_group(url, mode="r", storage_options=options)
        np.testing.assert_array_equal(group["u"][:], zarr.open_group(stores["turb"], mode="r")["u"][:])
        ds = xr.open_zarr(url, storage_options=options).load()
        assert ds.u.shape == SHAPE

"""The block server's plain zarr v3 view (/zarr/NAME) read by zarr-python and xarray, no tierscope client."""

from __future__ import annotations

import dataclasses
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

from tierscope.metadata import DatasetInfo
from tierscope.server import BlockService, ServerThread
from tierscope.server.zarr_http import CHUNK_CACHE_CONTROL, METADATA_CACHE_CONTROL
from tierscope.store import write_sample
from tierscope.store.origin import ZarrOrigin, open_origin

SHAPE, BLOCK = (3, 5, 6, 7), (2, 4, 4, 4)  # partial blocks at every edge
SYNTHETIC = "sample://syn?shape=3,5,6,7&block=2,4,4,4&variables=u,w&seed=2"
TOKEN = "zarr-token"
# xarray writes <U coordinates as zarr-python's fixed_length_utf32, which warns that it has no v3 spec yet
pytestmark = pytest.mark.filterwarnings("ignore:The data type .FixedLengthUTF32")


@dataclasses.dataclass(frozen=True)
class _LeveledInfo(DatasetInfo):
    """Until levels land: a DatasetInfo with the levels branch's ``levels`` field."""

    levels: int = 1


class _LeveledOrigin(ZarrOrigin):
    """Until levels land: a real zarr store that says it has two levels; level 1 is served as NAME@1
    (the levels branch's names). After the merge, write the store with levels instead."""

    def info(self) -> DatasetInfo:
        info = super().info()
        fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(info) if f.name != "levels"}
        return _LeveledInfo(**fields, levels=2)


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
    root = tmp_path_factory.mktemp("zarrhttp")
    turb = write_sample(root / "turb.zarr", shape=SHAPE, block=BLOCK, variables=("u", "p"), seed=1)
    level1 = root / "turb1.zarr"
    coarse = xr.open_zarr(turb, consolidated=False).coarsen(z=2, y=2, x=2, boundary="pad").mean().load()
    for name in coarse.data_vars:
        coarse[name].encoding = {"chunks": BLOCK}
    coarse.to_zarr(level1, zarr_format=3, consolidated=False)
    return {"turb": turb, "turb1": level1, "cf": _cf_store(root / "cf.zarr")}


@pytest.fixture(scope="module")
def server(stores):
    origins = [_LeveledOrigin(stores["turb"]), ZarrOrigin(stores["turb1"], name="turb@1"),
               ZarrOrigin(stores["cf"]), open_origin(SYNTHETIC)]
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


def _without_ome(ds):
    ome = ds.attrs.pop("ome")
    assert ome["version"] == "0.5"
    return ds


def test_plain_zarr_reads_every_array_as_stored(server, stores):
    remote = zarr.open_group(f"{server.url}/zarr/turb", mode="r")
    local = zarr.open_group(stores["turb"], mode="r")
    assert sorted(remote.array_keys()) == sorted(local.array_keys()) == ["p", "time", "u", "x", "y", "z"]
    for key in local.array_keys():
        got, want = remote[key], local[key]
        assert (got.shape, got.chunks, got.dtype) == (want.shape, want.chunks, want.dtype), key
        assert got.metadata.dimension_names == want.metadata.dimension_names
        assert got.attrs.asdict() == want.attrs.asdict(), key  # _FillValue in xarray's zarr v3 form
        np.testing.assert_array_equal(got[:], want[:])  # every chunk, the partial edge ones included


@pytest.mark.parametrize("name", ["turb", "cf"])
def test_xarray_reads_what_tierscope_and_the_store_give(server, stores, name):
    remote = _without_ome(_open_zarr(f"{server.url}/zarr/{name}"))
    xr.testing.assert_identical(remote, xr.open_zarr(stores[name], consolidated=False).load())
    # tierscope's own block path serves no text data variables: compare the rest
    with xr.open_dataset(stores[name], engine="tierscope", drop_variables=["label"]) as ds:
        xr.testing.assert_identical(remote.drop_vars("label", errors="ignore"), ds.load())
    if name == "cf":  # CF decoding as from the store: packed ints, fill values, datetimes, text
        assert remote.temp.dtype == np.float64 and np.isnan(remote.temp[1, 2])
        assert remote.time.dtype.kind == "M" and remote.station.dtype == "<U5"


def test_a_synthetic_dataset_reads_like_tierscope_opens_it(server):
    remote = _without_ome(_open_zarr(f"{server.url}/zarr/syn"))
    with xr.open_dataset(SYNTHETIC, engine="tierscope") as ds:
        xr.testing.assert_identical(remote, ds.load())


def test_levels_are_subgroups_with_ome_multiscales(server, stores):
    url = f"{server.url}/zarr/turb"
    level1 = _open_zarr(url, group="1")
    xr.testing.assert_identical(level1, xr.open_zarr(stores["turb1"], consolidated=False).load())
    multiscales = zarr.open_group(url, mode="r").attrs["ome"]["multiscales"]
    entry = {m["name"]: m for m in multiscales}["u"]
    assert sorted(m["name"] for m in multiscales) == ["p", "u"]
    assert [(a["name"], a["type"]) for a in entry["axes"]] == [
        ("time", "time"), ("z", "space"), ("y", "space"), ("x", "space")]
    assert entry["axes"][0]["unit"] == "second" and entry["axes"][3]["unit"] == "meter"
    assert [d["path"] for d in entry["datasets"]] == ["u", "1/u"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in entry["datasets"]]
    assert scales[0][3] == pytest.approx(2 * math.pi / SHAPE[3])
    assert scales[1][3] == pytest.approx(2 * scales[0][3]) and scales[1][0] == scales[0][0]
    # one dataset per level, and a plain synthetic dataset has one level
    syn = zarr.open_group(f"{server.url}/zarr/syn", mode="r").attrs["ome"]["multiscales"]
    assert sorted([d["path"] for d in m["datasets"]] for m in syn) == [["u"], ["w"]]
    assert request(server, "GET", "/zarr/syn/1/zarr.json")[0] == 404


def test_a_partial_edge_chunk_is_full_size_and_lossless(server, stores):
    status, headers, body = request(server, "GET", "/zarr/turb/u/c/1/1/1/1")
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    chunk = np.frombuffer(zstandard.ZstdDecompressor().decompress(body), "<f4").reshape(BLOCK)
    block = zarr.open_group(stores["turb"], mode="r")["u"].get_block_selection((1, 1, 1, 1))
    assert block.shape == (1, 1, 2, 3)
    np.testing.assert_array_equal(chunk[:1, :1, :2, :3], block)
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
    ("/zarr/turb@1/zarr.json", "DatasetNotFoundError", "/zarr/turb/1/"),
    ("/zarr/turb/q/zarr.json", "HTTPNotFound", "no zarr key 'q/zarr.json'"),
    ("/zarr/turb/q/c/0/0/0/0", "VariableNotFoundError", "no array 'q'"),
    ("/zarr/turb/u/c/2/0/0/0", "BlockIndexError", "out of range on axis 0"),
    ("/zarr/turb/u/c/0/0/0", "BlockIndexError", "has 3 axes, expected 4"),
    ("/zarr/turb/u/c/0/0/0/0/0", "HTTPNotFound", "malformed chunk key"),
    ("/zarr/turb/u/c/0/x/0/0", "HTTPNotFound", "malformed chunk key"),
    ("/zarr/turb/u/c/0.0.0.0", "HTTPNotFound", "malformed chunk key"),
    ("/zarr/turb/time/c/1", "BlockIndexError", "out of range"),
    ("/zarr/turb/2/u/zarr.json", "HTTPNotFound", "no zarr key"),
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

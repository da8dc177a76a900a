"""The block server over real HTTP on loopback."""

import http.client
import json
from urllib.parse import urlsplit

import numpy as np
import pytest
import zarr

from tierscope import codec
from tierscope.client.source import Source
from tierscope.errors import (
    BlockIndexError,
    DatasetNotFoundError,
    ServerUnavailableError,
    StoreError,
    VariableNotFoundError,
)


def request(server, method, path):
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request(method, path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), body


def test_lists_and_describes_datasets(server):
    status, _, body = request(server, "GET", "/datasets")
    assert status == 200 and json.loads(body) == {"datasets": ["turb"]}
    status, _, body = request(server, "GET", "/datasets/turb")
    info = json.loads(body)
    assert info["variables"]["u"]["shape"] == [4, 16, 32, 32]
    assert info["variables"]["u"]["block"] == [1, 8, 16, 16]
    assert info["variables"]["u"]["dtype"] == "<f4"
    assert set(info["coords"]) == {"time", "z", "y", "x"}
    assert info["dims"] == {"time": 4, "z": 16, "y": 32, "x": 32}


def test_block_body_is_a_verified_frame_equal_to_the_store(server, sample_store):
    status, headers, body = request(server, "GET", "/datasets/turb/blocks/u/2.1.0.1?tol=0")
    assert status == 200
    assert headers["X-Tierscope-Tier"] == "origin"
    assert float(headers["X-Tierscope-Read-Ms"]) >= 0
    expected = zarr.open_group(sample_store, mode="r")["u"].get_block_selection((2, 1, 0, 1))
    np.testing.assert_array_equal(codec.decode(body), expected)
    assert codec.read_header(body).tol == 0.0


@pytest.mark.parametrize(
    ("path", "status", "kind", "message"),
    [
        ("/datasets/nope", 404, "DatasetNotFoundError", "no dataset named 'nope'"),
        ("/datasets/turb/blocks/q/0.0.0.0", 404, "VariableNotFoundError", "no variable 'q'"),
        ("/datasets/turb/blocks/u/4.0.0.0", 404, "BlockIndexError", "out of range on axis 0"),
        ("/datasets/turb/blocks/u/0.0.0", 404, "BlockIndexError", "has 3 axes, expected 4"),
        ("/datasets/turb/blocks/u/0.x.0.0", 400, "ValueError", "malformed block index"),
        ("/datasets/turb/blocks/u/-1.0.0.0", 400, "ValueError", "malformed block index"),
        ("/datasets/turb/blocks/u/0.0.0.0?tol=-1", 400, "ValueError", "tol must be finite"),
        ("/datasets/turb/blocks/u/0.0.0.0?tol=nan", 400, "ValueError", "tol must be finite"),
        ("/datasets/turb/blocks/u/0.0.0.0?tol=abc", 400, "ValueError", "tol must be a finite number"),
        ("/datasets/turb/blocks/u/0.0.0.0?purpose=x", 400, "ValueError", "purpose must be one of"),
        ("/datasets/turb/blocks/u/0.0.0.0?codec=x", 400, "ValueError", "unknown codec"),
        ("/nothing/here", 404, "HTTPNotFound", "Not Found"),
    ],
)
def test_bad_requests_get_json_4xx_and_the_server_stays_up(server, path, status, kind, message):
    got, _, body = request(server, "GET", path)
    payload = json.loads(body)
    assert got == status and payload["type"] == kind
    assert message.lower() in payload["error"].lower()
    assert request(server, "GET", "/datasets")[0] == 200


def test_http_transport_reraises_server_errors_as_their_class(dataset_url):
    transport = Source.parse(dataset_url).transport()
    with pytest.raises(DatasetNotFoundError, match="no dataset named 'other'"):
        transport.info("other")
    with pytest.raises(VariableNotFoundError, match="no variable 'q'"):
        transport.fetch("turb", "q", (0, 0, 0, 0), 0.0)
    with pytest.raises(BlockIndexError, match="out of range"):
        transport.fetch("turb", "u", (0, 9, 0, 0), 0.0)


def test_server_counts_requests_by_purpose(server, dataset_url):
    transport = Source.parse(dataset_url).transport()
    before = transport.server_stats()
    transport.fetch("turb", "v", (0, 0, 0, 0), 0.0, purpose="prefetch")
    transport.fetch("turb", "v", (0, 0, 0, 0), 0.0)
    after = transport.server_stats()
    assert after["requests"]["prefetch"] == before["requests"]["prefetch"] + 1
    assert after["requests"]["user"] == before["requests"]["user"] + 1
    assert after["origin_reads"] == before["origin_reads"] + 2


def test_a_server_that_is_down_is_named_in_the_error():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/datasets/turb"
    with pytest.raises(ServerUnavailableError, match=f"127.0.0.1:{port}"):
        Source.parse(url).transport().info("turb")


def test_unreadable_store_is_a_clear_error(tmp_path):
    from tierscope.store.origin import ZarrOrigin

    with pytest.raises(StoreError, match="no such file"):
        ZarrOrigin(tmp_path / "missing.zarr")
    (tmp_path / "junk.zarr").mkdir()
    (tmp_path / "junk.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="junk.zarr"):
        ZarrOrigin(tmp_path / "junk.zarr")


def test_malformed_dataset_urls_are_rejected():
    with pytest.raises(ValueError, match="expected http://HOST:PORT/datasets/NAME"):
        Source.parse("http://127.0.0.1:1/turb")


def test_server_thread_that_cannot_bind_fails_cleanly(server):
    import threading

    from tierscope.server import ServerThread

    before = threading.active_count()
    with pytest.raises(OSError):
        ServerThread(server.service, port=server.port).start()  # port taken
    assert threading.active_count() == before


def test_a_damaged_block_reaches_the_client_as_a_store_error(tmp_path):
    from tierscope.server import BlockService, ServerThread
    from tierscope.store import write_sample
    from tierscope.store.origin import ZarrOrigin

    store = write_sample(tmp_path / "hurt.zarr", shape=(2, 8, 8, 8), block=(1, 8, 8, 8), variables=("u",))
    (store / "u" / "c" / "1" / "0" / "0" / "0").write_bytes(b"not a zstd chunk")
    with ServerThread(BlockService([ZarrOrigin(store)])) as server:
        transport = Source.parse(f"{server.url}/datasets/hurt").transport()
        with pytest.raises(StoreError, match=r"reading block \(1, 0, 0, 0\) of 'u'"):
            transport.fetch("hurt", "u", (1, 0, 0, 0), 0.0)
        assert codec.decode(transport.fetch("hurt", "u", (0, 0, 0, 0), 0.0).frame).shape == (1, 8, 8, 8)


"""L3/L4 tiers, policies, runtime configuration, prefetch, batch, token and metrics on a real server."""

import http.client
import json
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
import xarray as xr
import zarr

from tierscope import codec
from tierscope.cache import entry_charge
from tierscope.client.http import HttpTransport, split_batch
from tierscope.client.source import Source
from tierscope.errors import AuthenticationError, ServerUnavailableError
from tierscope.server import BlockService, ServerThread
from tierscope.store.origin import ZarrOrigin

from conftest import wait_for

BLOCK_NBYTES = 8 * 16 * 16 * 4  # conftest's (1, 8, 16, 16) float32 blocks


def call(server, method, path, body=None, headers=None):
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), payload


def get_json(server, path):
    status, _, body = call(server, "GET", path)
    assert status == 200, body
    return json.loads(body)


def configure(server, **config):
    status, _, body = call(server, "PUT", "/config", config)
    assert status == 200, body
    return json.loads(body)


def tier_of(server, path, headers=None):
    status, headers_out, body = call(server, "GET", path, headers=headers)
    assert status == 200, body
    return headers_out["X-Tierscope-Tier"]


@pytest.fixture(scope="module")
def tiered(sample_store):
    with ServerThread(BlockService([ZarrOrigin(sample_store)], l3="1MiB", l4="4MiB")) as running:
        yield running


@pytest.fixture
def blocks(sample_store):
    group = zarr.open_group(sample_store, mode="r")
    return lambda var, index: group[var].get_block_selection(index)


def test_l4_hit_avoids_the_origin_read_and_l3_hit_avoids_the_encode(tiered, blocks):
    configure(tiered, l3=0, l4="1MiB", prefetch="off")
    assert tier_of(tiered, "/datasets/turb/blocks/u/1.0.1.0?tol=0.1") == "origin"
    assert tier_of(tiered, "/datasets/turb/blocks/u/1.0.1.0?tol=0.2") == "l4"
    stats = get_json(tiered, "/stats")
    assert (stats["origin_reads"], stats["encodes"]) == (1, 2)
    assert stats["served_by"] == {"l3": 0, "l4": 1, "origin": 1}
    assert stats["tiers"]["l4"]["nbytes"] == entry_charge(BLOCK_NBYTES)
    assert stats["tiers"]["l3"]["nbytes"] == 0

    configure(tiered, l3="1MiB")
    assert tier_of(tiered, "/datasets/turb/blocks/u/1.0.1.0?tol=0.1") == "origin"  # re-init cleared L4
    status, headers, body = call(tiered, "GET", "/datasets/turb/blocks/u/1.0.1.0?tol=0.1")
    assert headers["X-Tierscope-Tier"] == "l3" and float(headers["X-Tierscope-Encode-Ms"]) == 0
    stats = get_json(tiered, "/stats")
    assert (stats["origin_reads"], stats["encodes"]) == (1, 1)
    assert stats["tiers"]["l3"]["nbytes"] == entry_charge(len(body))  # L3 counts encoded bytes
    assert len(body) < BLOCK_NBYTES
    np.testing.assert_allclose(codec.decode(body), blocks("u", (1, 0, 1, 0)), atol=0.1 + 1e-6)
    assert stats["stages"]["read"]["count"] == 1 and stats["stages"]["encode"]["count"] == 1
    assert stats["stages"]["read"]["max_ms"] >= stats["stages"]["read"]["p50_ms"] > 0


@pytest.mark.parametrize(("policy", "a_after"), [("lru", "l4"), ("fifo", "origin"), ("lfu", "l4")])
def test_server_policy_eviction_order(tiered, policy, a_after):
    configure(tiered, l3=0, l4=2 * entry_charge(BLOCK_NBYTES, policy), policy=policy, prefetch="off")
    a, b, c = ("/datasets/turb/blocks/p/%s" % i for i in ("0.0.0.0", "0.0.0.1", "0.0.1.0"))
    for path in (a, b, a, c):  # A hit once; C needs room: lru/lfu evict B, fifo evicts A
        tier_of(tiered, path)
    assert tier_of(tiered, a) == a_after
    assert get_json(tiered, "/stats")["tiers"]["l4"]["policy"] == policy


def test_distance_policy_evicts_the_block_farthest_from_the_sessions(tiered):
    configure(tiered, l3=0, l4=2 * entry_charge(BLOCK_NBYTES, "distance"), policy="distance", prefetch="off")
    here = {"X-Tierscope-Session": "s1", "X-Tierscope-Position": "0.0.0.0"}
    near, far, new = "0.0.0.0", "3.1.1.1", "0.0.0.1"
    for index in (near, far, new):  # far is 4 hops from the view: evicted though more recent than near
        tier_of(tiered, f"/datasets/turb/blocks/v/{index}", headers=here)
    assert tier_of(tiered, f"/datasets/turb/blocks/v/{near}", headers=here) == "l4"
    assert tier_of(tiered, f"/datasets/turb/blocks/v/{far}", headers=here) == "origin"


def test_put_config_size_zero_turns_tiers_off_and_validates(tiered):
    config = configure(tiered, l3=0, l4=0, prefetch="off", policy="lru")
    assert (config["l3"], config["l4"], config["page_cache_dropped"]) == (0, 0, [])
    for _ in range(3):
        assert tier_of(tiered, "/datasets/turb/blocks/u/0.0.0.0?tol=0") == "origin"
    stats = get_json(tiered, "/stats")
    assert stats["origin_reads"] == 3 and stats["tiers"]["l4"]["nbytes"] == 0
    assert get_json(tiered, "/config")["l4"] == 0
    for body, message in [
        ({"l3": "lots"}, "l3 must be a size"),
        ({"l4": -1}, "l4 must be >= 0"),
        ({"l3": 10**38}, f"l3 of {10**38} exceeds this machine's memory"),
        ({"l4": "1e38B"}, "l4 of '1e38B' exceeds this machine's memory"),
        ({"policy": "mru"}, "policy must be one of"),
        ({"prefetch": "sometimes"}, "prefetch must be on"),
        ({"drop_page_cache": "yes"}, "drop_page_cache must be true or false"),
        ({"l5": 1}, "unknown field(s) 'l5'"),
    ]:
        status, _, out = call(tiered, "PUT", "/config", body)
        assert status == 400 and message in json.loads(out)["error"], out
    assert get_json(tiered, "/config")["l3"] == 0  # a rejected config changed nothing


def test_config_string_sizes_and_page_cache_drop_when_the_origin_can(tiered):
    config = configure(tiered, l3="2MiB", l4="3 MiB", drop_page_cache=True)
    assert (config["l3"], config["l4"]) == (2 << 20, 3 << 20)
    origin = tiered.service.origin("turb")
    assert config["page_cache_dropped"] == (["turb"] if hasattr(origin, "drop_page_cache") else [])


def test_prefetch_fills_blocks_around_the_reported_position_before_they_are_asked(tiered):
    configure(tiered, l3="1MiB", l4="4MiB", policy="lru", prefetch="neighbourhood")
    view = {"X-Tierscope-Session": "viewer-1", "X-Tierscope-Position": "1.0.0.0;1.0.0.1"}
    assert tier_of(tiered, "/datasets/turb/blocks/u/1.0.0.0?tol=0.01", headers=view) == "origin"
    assert wait_for(lambda: (s := get_json(tiered, "/stats")["prefetch"])["queued"] == 0
                    and s["issued"] > 0 and s["issued"] + s["skipped"] == s["planned"])
    stats = get_json(tiered, "/stats")
    assert stats["requests"] == {"user": 1, "prefetch": 0} and stats["sessions"] == 1
    # the view's neighbours (t +- 1, z + 1, y + 1) are now served from L3 (the view itself is not planned)
    for index in ("0.0.0.0", "2.0.0.1", "1.1.1.1", "1.0.1.0"):
        assert tier_of(tiered, f"/datasets/turb/blocks/u/{index}?tol=0.01", headers=view) == "l3"
    stats = get_json(tiered, "/stats")
    assert stats["prefetch"]["used"] >= 4 and stats["tiers"]["l3"]["prefetch_used"] == 4
    assert stats["served_by"]["l3"] == 4


class GatedOrigin(ZarrOrigin):
    """The zarr origin, with reads on chosen threads held until the test opens the gate."""

    def __init__(self, path, thread_prefix):
        super().__init__(path)
        self.gate, self.held, self.prefix = threading.Event(), threading.Event(), thread_prefix

    def read_block(self, variable, index):
        if threading.current_thread().name.startswith(self.prefix):
            self.held.set()
            self.gate.wait(10)
        return super().read_block(variable, index)


def test_moving_on_cancels_the_queued_plan_and_users_overtake_prefetch(sample_store):
    origin = GatedOrigin(sample_store, "tierscope-prefetch")
    service = BlockService([origin], l3="1MiB", l4="4MiB", prefetch="neighbourhood", prefetch_workers=1)
    with ServerThread(service) as server:
        here = {"X-Tierscope-Session": "s", "X-Tierscope-Position": "0.0.0.0"}
        call(server, "GET", "/datasets/turb/blocks/u/0.0.0.0", headers=here)
        assert origin.held.wait(5)  # the one prefetch thread is stuck in a read
        first = get_json(server, "/stats")["prefetch"]
        assert first["issued"] == 1 and first["queued"] == first["planned"] - 1 > 0
        there = {"X-Tierscope-Session": "s", "X-Tierscope-Position": "3.1.1.1"}
        t0 = time.perf_counter()
        assert tier_of(server, "/datasets/turb/blocks/u/3.1.1.1", headers=there) == "origin"
        assert time.perf_counter() - t0 < 2  # not queued behind the stuck prefetch
        moved = get_json(server, "/stats")["prefetch"]
        assert moved["cancelled"] == first["queued"]
        origin.gate.set()
        assert wait_for(lambda: get_json(server, "/stats")["prefetch"]["queued"] == 0)


def test_batch_returns_every_frame_with_its_tier(tiered, blocks):
    configure(tiered, l3="1MiB", l4="4MiB", prefetch="off")
    wanted = [[0, 0, 0, 0], [3, 1, 1, 1], [0, 0, 0, 0], [2, 1, 0, 1]]
    body = {"variable": "p", "tol": 0.05, "blocks": wanted}
    status, headers, out = call(tiered, "POST", "/datasets/turb/batch", body)
    assert status == 200 and headers["Content-Type"].startswith("application/x-tierscope-batch")
    parts = split_batch(out)
    assert [list(index) for index, _ in parts] == wanted
    for index, block in parts:
        assert block.tier in ("origin", "l3") and block.server_s >= 0
        np.testing.assert_allclose(codec.decode(block.frame), blocks("p", index), atol=0.05 + 1e-6)
    stats = get_json(tiered, "/stats")
    assert stats["batches"] == 1 and stats["requests"]["user"] == 4 and stats["origin_reads"] == 3
    transport = HttpTransport(tiered.url)
    frames = transport.fetch_many("turb", "p", [tuple(b) for b in wanted], 0.05, session="b")
    assert [f.frame for f in frames] == [b.frame for _, b in parts]  # same bytes, now all from L3
    assert {f.tier for f in frames} == {"l3"}
    transport.close()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[" * 50_000, 400, "not valid JSON"),  # nesting beyond the parser's recursion limit
        (b"[1, 2]", 400, "must be a JSON object"),
        ({"blocks": [[0, 0, 0, 0]]}, 400, "variable is required"),
        ({"variable": "u", "blocks": []}, 400, "1 to 256 block indices"),
        ({"variable": "u", "blocks": [[0, 0, 0, 0]] * 257}, 400, "1 to 256 block indices"),
        ({"variable": "u", "blocks": [[0, -1, 0, 0]]}, 400, "non-negative integers"),
        ({"variable": "u", "blocks": [[0, True, 0, 0]]}, 400, "non-negative integers"),
        ({"variable": "u", "blocks": "0.0.0.0"}, 400, "must be a list"),
        ({"variable": "u", "blocks": [[9, 0, 0, 0]]}, 404, "out of range"),
        ({"variable": "u", "tol": "x", "blocks": [[0, 0, 0, 0]]}, 400, "tol must be a finite number"),
        ({"variable": "u", "tol": 10**400, "blocks": [[0, 0, 0, 0]]}, 400, "tol must be a finite number"),
        ({"variable": "u", "tol": None, "blocks": [[0, 0, 0, 0]]}, 400, "tol must be a number"),
        ({"variable": "u", "blocks": [[0, 0, 0, 0]], "extra": 1}, 400, "unknown field(s) 'extra'"),
        (b"x" * (70 << 10), 413, "maximum request body size 65536"),
    ],
)
def test_bad_batches_get_json_errors(tiered, body, status, message):
    got, _, out = call(tiered, "POST", "/datasets/turb/batch", body)
    assert got == status and message.lower() in json.loads(out)["error"].lower(), out


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"X-Tierscope-Session": "bad session!"}, "X-Tierscope-Session must be 1-128 characters"),
        ({"X-Tierscope-Session": "s" * 129}, "X-Tierscope-Session must be"),
        ({"X-Tierscope-Position": "9.0.0.0"}, "X-Tierscope-Position: block index (9, 0, 0, 0) is out of"),
        ({"X-Tierscope-Position": "0.0.0"}, "X-Tierscope-Position: block index (0, 0, 0) has 3 axes"),
        ({"X-Tierscope-Position": "0.a.0.0"}, "malformed X-Tierscope-Position block"),
        ({"X-Tierscope-Position": ";".join(["0.0.0.0"] * 65)}, "at most 64"),
        ({"X-Tierscope-Link": "fast"}, "X-Tierscope-Link must be a number of bytes per second, got 'fast'"),
        ({"X-Tierscope-Link": "-5"}, "link throughput must be a positive number of bytes/s, got -5.0"),
        ({"X-Tierscope-Link": "nan"}, "link throughput must be a positive number of bytes/s, got nan"),
    ],
)
def test_bad_session_and_position_headers_are_400_naming_the_header(tiered, headers, message):
    status, _, out = call(tiered, "GET", "/datasets/turb/blocks/u/0.0.0.0", headers=headers)
    assert status == 400 and message in json.loads(out)["error"], out


def test_position_header_is_the_box_of_its_blocks(sample_store):
    service = BlockService([ZarrOrigin(sample_store)], l3="64MiB", l4="64MiB", prefetch="on")
    with ServerThread(service) as server:  # its own: its prefetch must not outlive it into other tests
        view = ";".join(f"{t}.0.{y}.{x}" for t in range(2) for y in range(2) for x in range(2))
        headers = {"X-Tierscope-Session": "big", "X-Tierscope-Position": ";".join([view] * 8)}  # 64 blocks
        status, _, _ = call(server, "GET", "/datasets/turb/blocks/u/0.0.0.0", headers=headers)
        assert status == 200
        corners = {"X-Tierscope-Session": "big", "X-Tierscope-Position": "1.0.1.1;0.0.0.0"}
        call(server, "GET", "/datasets/turb/blocks/u/0.0.0.0", headers=corners)
        prefetch = json.loads(call(server, "GET", "/stats")[2])["prefetch"]
    assert prefetch["planned"] > 0  # the first header's view planned once; its corners are the same box
    assert prefetch["cancelled"] == 0


def test_unknown_or_repeated_query_parameters_are_rejected(tiered):
    for query, message in [("?tol=0&tol=1", "given more than once"), ("?tool=1", "unknown query parameter")]:
        status, _, out = call(tiered, "GET", f"/datasets/turb/blocks/u/0.0.0.0{query}")
        assert status == 400 and message in json.loads(out)["error"]


def test_metrics_are_prometheus_text_per_server(tiered, server):
    configure(tiered, l3="1MiB", l4="1MiB", prefetch="off")
    tier_of(tiered, "/datasets/turb/blocks/u/0.1.0.0")
    tier_of(tiered, "/datasets/turb/blocks/u/0.1.0.0")
    status, headers, body = call(tiered, "GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'tierscope_requests_total{purpose="user"} 2.0' in text
    assert "tierscope_origin_reads_total 1.0" in text
    assert 'tierscope_served_total{tier="l3"} 1.0' in text
    assert 'tierscope_tier_capacity_bytes{tier="l4"} 1.048576e+06' in text
    assert 'tierscope_stage_count{stage="read"} 1.0' in text
    assert call(server, "GET", "/metrics")[0] == 200  # a second server in this process, own registry


def test_stats_reset(tiered):
    tier_of(tiered, "/datasets/turb/blocks/u/0.1.0.1")
    assert call(tiered, "POST", "/stats/reset")[0] == 200
    stats = get_json(tiered, "/stats")
    assert stats["requests"] == {"user": 0, "prefetch": 0} and stats["stages"]["read"]["count"] == 0
    assert stats["tiers"]["l3"]["hits"] == 0


@pytest.fixture(scope="module")
def guarded(sample_store):
    with ServerThread(BlockService([ZarrOrigin(sample_store)]), token="s3cret-token") as running:
        yield running


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic s3cret-token", "Bearer ", "s3cret-token",
                                  "Bearer s3cret-token-and-more"])
def test_token_required_when_configured(guarded, auth):
    headers = {} if auth is None else {"Authorization": auth}
    for method, path in [("GET", "/datasets"), ("GET", "/datasets/turb/blocks/u/0.0.0.0"),
                         ("GET", "/stats"), ("PUT", "/config"), ("GET", "/metrics")]:
        status, out_headers, out = call(guarded, method, path, body=b"{}", headers=headers)
        assert status == 401 and out_headers["WWW-Authenticate"] == "Bearer"
        assert "bearer token" in json.loads(out)["error"]


def test_token_clients(guarded, monkeypatch):
    headers = {"Authorization": "Bearer s3cret-token"}
    assert call(guarded, "GET", "/datasets", headers=headers)[0] == 200
    url = f"{guarded.url}/datasets/turb"
    with pytest.raises(AuthenticationError, match="HTTP 401.*TIERSCOPE_TOKEN"):
        Source.parse(url, token="nope").transport().info("turb")
    ds = xr.open_dataset(url, engine="tierscope", token="s3cret-token")
    assert ds.u.isel(time=0, z=0, y=0, x=slice(0, 4)).values.shape == (4,)
    monkeypatch.setenv("TIERSCOPE_TOKEN", "s3cret-token")
    assert Source.parse(url).transport().info("turb").name == "turb"
    assert "s3cret" not in repr(Source.parse(url))


def test_graceful_shutdown_finishes_the_response_in_flight(sample_store, blocks):
    origin = GatedOrigin(sample_store, "tierscope-user")
    server = ServerThread(BlockService([origin])).start()
    got = {}

    def fetch():
        got["response"] = call(server, "GET", "/datasets/turb/blocks/v/2.1.1.0")

    client = threading.Thread(target=fetch)
    client.start()
    assert origin.held.wait(5)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    time.sleep(0.2)
    assert stopper.is_alive()  # waiting for the response in flight
    origin.gate.set()
    client.join(10)
    stopper.join(20)
    status, headers, body = got["response"]
    assert status == 200 and headers["X-Tierscope-Tier"] == "origin"
    np.testing.assert_array_equal(codec.decode(body), blocks("v", (2, 1, 1, 0)))
    with pytest.raises(OSError):
        call(server, "GET", "/datasets")


def _frame_and_config(store, device):
    with ServerThread(BlockService([ZarrOrigin(store)], device=device)) as server:
        status, _, frame = call(server, "GET", "/datasets/turb/blocks/u/1.0.1.0?tol=0.05")
        assert status == 200, frame
        return frame, get_json(server, "/config")


@pytest.mark.skipif(codec.gpu_available(), reason="checks the CPU fallback of a machine without a GPU")
def test_encode_device_is_the_cpu_here_and_gpu_without_one_fails_at_construction(sample_store, blocks):
    for device in ("auto", "cpu"):
        frame, config = _frame_and_config(sample_store, device)
        assert config["encode_device"] == "cpu"
        assert frame == codec.encode(blocks("u", (1, 0, 1, 0)), 0.05, codec="lorenzo")
    with pytest.raises(RuntimeError, match="device='gpu' needs (CuPy|a CUDA GPU)"):
        BlockService([ZarrOrigin(sample_store)], device="gpu")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, gpu, got 'tpu'"):
        BlockService([ZarrOrigin(sample_store)], device="tpu")


@pytest.mark.skipif(not codec.gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_gpu_encoding_server_serves_the_cpu_frame(sample_store, blocks):
    gpu_frame, config = _frame_and_config(sample_store, "gpu")
    assert config["encode_device"] == "gpu"
    assert _frame_and_config(sample_store, "auto")[1]["encode_device"] == "gpu"
    assert gpu_frame == _frame_and_config(sample_store, "cpu")[0]
    assert gpu_frame == codec.encode(blocks("u", (1, 0, 1, 0)), 0.05, codec="lorenzo")


def _l1_blocks():
    from tierscope.dask.tiers import local_tiers

    l1 = local_tiers().l1
    return [l1.peek(key) for key in l1.keys()], l1.size


def _view_u(dataset_url):
    return xr.open_dataset(dataset_url, engine="tierscope").u.isel(time=1, z=slice(0, 8)).values


@pytest.mark.skipif(codec.gpu_available(), reason="checks the CPU fallback of a machine without a GPU")
def test_worker_tiers_decode_on_the_cpu_here(dataset_url, blocks):
    import tierscope
    from tierscope.dask.tiers import local_tiers

    expected = codec.decode(codec.encode(blocks("u", (1, 0, 0, 0)), 0.0, codec="lorenzo"))[0]
    for device in ("auto", "cpu"):
        tierscope.connect(None, l1="8MiB", l2="8MiB", device=device)
        assert local_tiers().device == "cpu"
        got = _view_u(dataset_url)
        np.testing.assert_array_equal(got[:, :16, :16], expected)
        cached, nbytes = _l1_blocks()
        assert cached and all(type(b) is np.ndarray and not b.flags.writeable for b in cached)
        assert nbytes == sum(entry_charge(b.nbytes) for b in cached)
    with pytest.raises(RuntimeError, match="device='gpu' needs (CuPy|a CUDA GPU)"):
        tierscope.connect(None, device="gpu")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, gpu, got 'tpu'"):
        tierscope.connect(None, device="tpu")


@pytest.mark.skipif(not codec.gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_worker_tiers_keep_l1_on_the_gpu(dataset_url):
    import cupy

    import tierscope
    from tierscope.dask.tiers import local_tiers

    tierscope.connect(None, l1="8MiB", l2="8MiB", device="cpu")
    on_cpu = _view_u(dataset_url)
    tierscope.connect(None, l1="8MiB", l2="8MiB", device="auto")
    assert local_tiers().device == "gpu"
    on_gpu = _view_u(dataset_url)
    assert type(on_gpu) is np.ndarray and on_gpu.tobytes() == on_cpu.tobytes()
    cached, nbytes = _l1_blocks()
    assert cached and all(isinstance(b, cupy.ndarray) for b in cached)
    assert nbytes == sum(entry_charge(b.nbytes) for b in cached)
    again = _view_u(dataset_url)  # L1 hits hand out fresh host copies
    again[:] = -1
    assert _view_u(dataset_url).tobytes() == on_cpu.tobytes()
    tierscope.connect(None, l1="8MiB", l2="8MiB")

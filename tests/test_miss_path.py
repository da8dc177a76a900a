"""The miss path (issue #10): user misses overtake prefetch at the server and the worker, a jump drops
the old position's prefetch at both, tighter frames answer looser views, pre-encoded stores serve without
an encode, and a slow encoder makes the server send raw. Real server on loopback, real LocalCluster."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

import tierscope
from tierscope import codec
from tierscope.client.http import HttpTransport
from tierscope.codec.bounded import LorenzoCodec
from tierscope.codec.registry import register_codec
from tierscope.dask.prefetcher import Plan, Prefetcher
from tierscope.dask.tiers import WorkerTiers
from tierscope.protocol import BlockSpec
from tierscope.server import BlockService, ServerThread
from tierscope.store.origin import ZarrOrigin, open_origin

from conftest import BLOCK, SHAPE, GatedOrigin, wait_for


def recording(origin, free_steps=()):
    """``origin`` with its reads recorded; reads at time steps other than ``free_steps`` wait for its gate."""
    return GatedOrigin(origin, lambda level, index: index[0] not in free_steps)


def spec_of(url: str, tol: float = 0.0, variable: str = "u") -> BlockSpec:
    from tierscope.client.source import Source
    from tierscope.grid import BlockGrid

    return BlockSpec(Source.parse(url), variable, tol, BlockGrid(SHAPE, BLOCK), "<f4", 0)


def test_a_user_miss_overtakes_the_prefetch_backlog_on_the_worker_and_the_server(sample_store):
    origin = recording(ZarrOrigin(sample_store))
    with ServerThread(BlockService([origin], prefetch_workers=1)) as server:
        url = f"{server.url}/datasets/turb"
        tiers = WorkerTiers(64 << 20, 64 << 20, device="cpu")
        prefetcher = Prefetcher(tiers)
        try:
            spec = spec_of(url)
            backlog = tuple((t, z, y, x) for t in (1, 2) for z in (0, 1) for y in (0, 1) for x in (0, 1))
            with tierscope_config(blocks=4):
                prefetcher.submit(Plan(1, "s", spec, ((0, 0, 0, 0), (0, 0, 0, 0)), backlog, (True,) * 16))
                assert origin.held.wait(10)  # the first prefetch batch (4 blocks) is stuck at the origin
                user = threading.Thread(target=tiers.load, args=(spec, (3, 1, 1, 1)))
                user.start()
                assert wait_for(lambda: server.service.stats()["requests"]["user"] == 1)
                origin.gate.set()
                user.join(20)
                assert wait_for(lambda: prefetcher.queued() == 0 and len(origin.reads) == 17)
        finally:
            prefetcher.close()
    # The user's block is read right after the batch that was already running, before the 12 queued ones:
    # neither the worker's prefetch thread nor the server's prefetch slot took more while it waited.
    assert origin.reads.index((3, 1, 1, 1)) <= 4
    assert set(origin.reads[:5]) - {(3, 1, 1, 1)} <= set(backlog[:4])


class tierscope_config:
    """dask.config for the prefetch batch size, in this process (the worker tiers run here)."""

    def __init__(self, blocks):
        import dask

        self._set = dask.config.set({"tierscope.prefetch-batch.blocks": blocks})

    def __enter__(self):
        return self._set.__enter__()

    def __exit__(self, *exc):
        return self._set.__exit__(*exc)


@pytest.fixture
def one_worker():
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        yield c


def test_a_jump_drops_the_old_positions_prefetch_at_the_server_and_the_worker(one_worker):
    # no coarse levels: the workers' prefetch of the coarsest level (decoded, so it goes first) would move
    # that level's own position at the server, whose plan a jump of level 0 rightly leaves be
    origin = recording(open_origin("sample://walk?shape=32,32,64,64&block=1,16,16,16&levels=0"),
                             free_steps=(0, 20))
    service = BlockService([origin], l3="64MiB", l4="64MiB", prefetch="neighbourhood", prefetch_workers=1)
    with ServerThread(service) as server:
        tierscope.connect(one_worker, l1="64MiB", l2="64MiB", prefetch="neighbourhood")
        ds = xr.open_dataset(f"{server.url}/datasets/walk", engine="tierscope")
        ds.u.isel(time=0, z=slice(0, 16)).values  # 16 blocks; prefetch of their neighbours is now queued
        assert origin.held.wait(10)  # behind the closed gate
        queued = service.stats()["prefetch"]["queued"]
        assert queued > 0
        assert wait_for(lambda: tierscope.stats(one_worker)["total"]["prefetch"]["queued"] > 0)
        ds.u.isel(time=20, z=slice(16, 32)).values  # a jump, far from where prefetch was heading
        assert service.stats()["prefetch"]["cancelled"] >= queued  # the server dropped the old plan at once
        worker = tierscope.stats(one_worker)["total"]["prefetch"]
        assert worker["cancelled"] > 0  # and so did the worker
        origin.gate.set()
        ds.close()


def test_a_tighter_cached_frame_answers_a_looser_view_without_a_fetch(dataset_url, client):
    tight = xr.open_dataset(dataset_url, engine="tierscope", tol=1e-3)
    loose = xr.open_dataset(dataset_url, engine="tierscope", tol=1e-2)
    a = tight.u.isel(time=2, z=slice(0, 8)).values  # 4 blocks
    fetched = tierscope.stats(client)["total"]["fetches"]
    b = loose.u.isel(time=2, z=slice(0, 8)).values
    stats = tierscope.stats(client)["total"]
    assert stats["fetches"] == fetched == 4  # the looser view fetched nothing ...
    assert stats["l1"]["hits"] == 4  # ... its 4 blocks were L1 hits on the tighter frames
    np.testing.assert_array_equal(a, b)


def test_a_pre_encoded_store_serves_within_tol_without_encoding(sample_store, tmp_path, client):
    out = tmp_path / "turb.zarr"
    subprocess.run([sys.executable, "-m", "tierscope", "ingest", str(sample_store), str(out), "--block",
                    ",".join(map(str, BLOCK)), "--tol", "0.01", "--levels", "1", "--quiet"], check=True)
    service = BlockService([ZarrOrigin(out)], l3="16MiB")
    with ServerThread(service) as server:
        url = f"{server.url}/datasets/turb"
        ref = xr.open_zarr(sample_store, consolidated=False).load()
        for tol in (0.01, 0.05):
            ds = xr.open_dataset(url, engine="tierscope", tol=tol)
            for name in ("u", "v", "p"):
                err = np.abs(ds[name].values.astype(np.float64) - ref[name].values)
                assert 0 < err.max() <= 0.01
            ds.close()
        stats = service.stats()
        assert stats["encodes"] == 0 and stats["origin_reads"] == 3 * 32  # each stored frame read once
        # the tol=0.05 views asked nothing: the workers held those frames (within 0.01) already
        assert stats["requests"]["user"] == 3 * 32
        assert tierscope.stats(client)["total"]["l1"]["hits"] >= 3 * 32
        with pytest.raises(ValueError, match=r"pre-encoded within 0\.01 .* need tol >= 0\.01, got 0\.001"):
            xr.open_dataset(url, engine="tierscope", tol=1e-3)
        # plain zarr readers get the values as stored: the frames decoded, not a 400 for a tighter tol
        plain = xr.open_zarr(f"{server.url}/zarr/turb", consolidated=True).load()
        local = xr.open_zarr(out, consolidated=False).load()
        for ds in (plain, local):  # each says its levels its own way (docs/protocol.md, "Plain zarr readers")
            ds.attrs.pop("ome")
        xr.testing.assert_identical(plain, local)
        coarse = xr.open_dataset(url, engine="tierscope", tol=0.01, level=1).load()  # levels are frames too
        expected = ref.coarsen(z=2, y=2, x=2, boundary="pad").mean()
        assert np.abs(coarse.u.values.astype(np.float64) - expected.u.values).max() <= 0.01
        assert service.stats()["encodes"] == 0


@register_codec
@dataclass(frozen=True)
class _SlowLorenzo(LorenzoCodec):
    """lorenzo at a fraction of its speed: an encoder that cannot keep up with the link."""

    name: ClassVar[str] = "slow-lorenzo-test"
    codec_id: ClassVar[str] = "tierscope.test.slow-lorenzo"

    def encode_payload(self, array, tol):  # noqa: ANN001, ANN201
        time.sleep(0.2)
        return super().encode_payload(array, tol)


def test_a_throttled_encoder_sends_raw_then_encodes_for_l3_in_the_background(tmp_path):
    from tierscope.store import write_sample

    store = write_sample(tmp_path / "turb.zarr", shape=(2, 32, 64, 64), block=(1, 16, 32, 32))  # 64 KiB
    service = BlockService([ZarrOrigin(store)], "slow-lorenzo-test", l3="16MiB", l4="16MiB", adapt=True)
    ref = xr.open_zarr(store, consolidated=False).u.values
    with ServerThread(service) as server:
        transport = HttpTransport(server.url)
        try:
            transport.fetch("turb", "u", (0, 0, 0, 0), 0.0)  # a lossless answer measures the link
            assert transport.link_bps is not None
            tol = 0.05
            blocks = [(1, z, y, x) for z in (0, 1) for y in (0, 1) for x in (0, 1)]
            frames = {index: transport.fetch("turb", "u", index, tol).frame for index in blocks}
            stats = service.stats()
            assert stats["raw_sent"] >= 1  # once one encode was timed, raw reached the client sooner
            assert stats["raw_sent"] + stats["encodes"] >= len(blocks)
            for (t, z, y, x), frame in frames.items():
                got = codec.decode(frame)
                want = ref[t:t + 1, z * 16:(z + 1) * 16, y * 32:(y + 1) * 32, x * 32:(x + 1) * 32]
                assert np.abs(got.astype(np.float64) - want).max() <= tol
                if codec.read_header(frame).codec == "raw":
                    np.testing.assert_array_equal(got, want)
            # the blocks sent raw were encoded for L3 in the background: asked again, they are L3 hits
            assert wait_for(lambda: service.stats()["encodes"] == 1 + len(blocks))  # the lossless one too
            for index in blocks:
                assert transport.fetch("turb", "u", index, tol).tier == "l3"
        finally:
            transport.close()


def test_a_streamed_batch_sends_each_block_as_soon_as_it_is_ready(sample_store):
    import json
    import urllib.error
    import urllib.request

    origin = recording(ZarrOrigin(sample_store), free_steps=(1,))
    ref = xr.open_zarr(sample_store, consolidated=False).u.values
    with ServerThread(BlockService([origin])) as server:
        transport = HttpTransport(server.url)
        try:
            arriving = transport.fetch_each("turb", "u", [(0, 0, 0, 0), (1, 0, 0, 0)], 0.0)
            index, block = next(arriving)  # (0, 0, 0, 0) is still held at the origin: (1, 0, 0, 0) comes first
            assert index == (1, 0, 0, 0) and origin.reads == [(1, 0, 0, 0)]
            origin.gate.set()
            rest = list(arriving)
            assert [i for i, _ in rest] == [(0, 0, 0, 0)]
            for (t, *_), got in ((index, block), *rest):
                np.testing.assert_array_equal(codec.decode(got.frame)[0], ref[t, :8, :16, :16])
        finally:
            transport.close()
        body = json.dumps({"variable": "u", "blocks": [[0, 0, 0, 0]], "stream": 1}).encode()
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(urllib.request.Request(f"{server.url}/datasets/turb/batch", data=body))
        assert error.value.code == 400 and "stream must be true or false" in json.load(error.value)["error"]


def test_a_small_read_does_not_wait_behind_a_big_ones_decodes(dataset_url, sample_store):
    tiers = WorkerTiers(64 << 20, 64 << 20, device="cpu")
    spec = spec_of(dataset_url)
    whole = tuple(slice(0, b) for b in BLOCK)
    busy = threading.Event()
    try:
        pool = tiers._decoders()  # every decode thread taken, as by a big read's queued decodes
        for _ in range(pool._max_workers):
            pool.submit(busy.wait, 20)
        small = [((1, 0, 0, 0), whole), ((1, 0, 1, 1), whole)]  # a coarse part's few blocks
        got = []
        reader = threading.Thread(target=lambda: got.extend(tiers.read_loading(spec, small)))
        reader.start()
        reader.join(10)  # the pool stays busy for 20 s: only a read that decodes in its own thread is done
        assert not reader.is_alive() and len(got) == 2
        ref = xr.open_zarr(sample_store, consolidated=False).u
        np.testing.assert_array_equal(got[0], ref.isel(time=slice(1, 2), z=slice(0, 8), y=slice(0, 16),
                                                       x=slice(0, 16)).values)
        assert tiers.stats()["l1"]["blocks"] == 2
    finally:
        busy.set()
        tiers.close()

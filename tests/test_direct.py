"""Direct reads: views skip the graph, their owners answering from L1/L2 or loading what they lack (real
server, 2-worker cluster)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import tierscope
from tierscope.cache import entry_charge
from tierscope.dask import direct
from tierscope.dask.direct import pieces
from tierscope.dask.scheduler import owner_of
from tierscope.client.source import Source
from tierscope.grid import BlockGrid
from tierscope.protocol import BlockSpec

from conftest import BLOCK, SHAPE


@pytest.mark.parametrize("key", [
    (1, slice(4, 13), slice(None), slice(3, 30)),
    (-1, 0, slice(15, 17), 31),
    (slice(None), slice(None), slice(None), slice(None)),
])
def test_pieces_reassemble_the_selection(key):
    grid = BlockGrid(SHAPE, BLOCK)
    whole = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    parts, shape = pieces(grid, key)
    out = np.full(shape, -1)
    for p in parts:
        origin = tuple(slice(i * b, (i + 1) * b) for i, b in zip(p.index, BLOCK, strict=True))
        out[p.dest] = whole[origin][p.part]
        np.testing.assert_array_equal(whole[p.source], whole[origin][p.part])
    expected = whole[key]
    np.testing.assert_array_equal(out.reshape(expected.shape), expected)
    assert len({p.index for p in parts}) == len(parts)


def test_pieces_leave_stepped_and_empty_selections_to_the_graph():
    grid = BlockGrid(SHAPE, BLOCK)
    assert pieces(grid, (0, slice(None, None, 2), slice(None), slice(None))) is None
    assert pieces(grid, (0, slice(5, 5), slice(None), slice(None))) is None
    assert pieces(grid, (0, slice(None), slice(None))) is None  # wrong number of axes


def counts(client):
    stats = tierscope.stats(client)
    return stats["total"]["l1"]["hits"], stats["total"]["l1"]["misses"], stats["scheduler"]["loads"]


@pytest.fixture
def views(sample_store, dataset_url):
    ds = xr.open_dataset(dataset_url, engine="tierscope")
    ref = xr.open_zarr(sample_store, consolidated=False).u.load()

    def view(**sel):
        got = ds.u.isel(**sel).values
        np.testing.assert_array_equal(got, ref.isel(**sel).values)
        return got

    return view


def test_views_are_read_without_a_graph_and_owners_load_what_they_lack(client, views):
    views(time=1, z=slice(0, 16))  # 2 x 2 x 2 blocks: all misses, each owner fetches its share in one batch
    assert counts(client) == (0, 8, 0)
    stats = tierscope.stats(client)["total"]
    assert stats["fetches"] == 8 and stats["l2"]["misses"] == 8
    views(time=1, z=slice(0, 16))
    assert counts(client) == (8, 8, 0)  # 8 hits
    views(time=1, z=3, y=slice(5, 20))  # a new, smaller view inside the held blocks
    assert counts(client) == (12, 8, 0)
    assert tierscope.stats(client)["scheduler"]["views"] == 2  # direct views still move the position


def test_a_partly_held_view_counts_each_block_once(client, views):
    views(time=2, z=slice(0, 8))  # 4 blocks
    views(time=2, z=slice(0, 16))  # 4 held, 4 new: their owners load them
    hits, misses, loads = counts(client)
    assert (hits, misses, loads) == (4, 8, 0)
    views(time=2, z=slice(0, 16))
    assert counts(client)[:2] == (hits + 8, misses)


def test_without_direct_reads_or_the_handler_every_view_takes_the_graph(client, views, dataset_url):
    tierscope.connect(client, l1="64MiB", l2="128MiB", prefetch="off", direct=False)
    views(time=3, z=slice(8, 16))
    views(time=3, z=slice(8, 16))
    assert counts(client) == (4, 4, 8)

    tierscope.connect(client, l1="64MiB", l2="128MiB", prefetch="off")
    views(time=3, z=slice(8, 16))
    client.run(lambda dask_worker: dask_worker.handlers.pop("tierscope_read") and None)  # an older worker
    views(time=3, z=slice(8, 16))  # no handler answers: the graph serves it, values still exact
    assert counts(client) == (4, 4, 4)
    spec = BlockSpec(Source.parse(dataset_url), "u", 0.0, BlockGrid(SHAPE, BLOCK), "<f4", 0)
    owners = {owner_of(spec, (3, z, y, x), sorted(client.scheduler_info()["workers"]))
              for z in (1,) for y in (0, 1) for x in (0, 1)}  # the blocks of z 8:16 (BLOCK = 8, 16, 16)
    assert set(direct._enabled[client.id].failed) == owners
    views(time=3, z=slice(8, 16))  # failed workers are not asked again for a while: straight to the graph
    assert counts(client) == (8, 4, 8)


def test_a_malformed_view_message_leaves_the_client_connected(client, views):
    from distributed.protocol.serialize import ToPickle

    for msg in ({}, {"spec": ToPickle(3), "box": [[0, 0, 0, 0], [0, 0, 0, 0]]}, {"spec": 3, "box": "x"}):
        client._send_to_scheduler({"op": "tierscope-view", **msg})
    views(time=1, z=slice(0, 8))
    views(time=1, z=slice(0, 8))
    assert client.status == "running" and counts(client) == (4, 4, 0)


def test_a_view_held_in_l2_is_decoded_on_its_owners_without_a_graph(client, views):
    block_nbytes = entry_charge(8 * 16 * 16 * 4)
    tierscope.connect(client, l1=block_nbytes, l2="128MiB", prefetch="off")  # L1: one block per worker
    views(time=0, z=slice(0, 16))  # 8 blocks: all reach L2, at most one per worker stays in L1
    assert counts(client) == (0, 8, 0)
    views(time=0, z=slice(0, 16))
    stats = tierscope.stats(client)["total"]
    assert stats["l2"]["hits"] >= 6 and stats["l1"]["hits"] + stats["l1"]["misses"] == 16
    assert counts(client)[2] == 0 and stats["fetches"] == 8  # no graph, nothing fetched again


def test_a_cancelled_read_is_not_loaded_even_when_the_cancel_overtakes_it(client, views, dataset_url):
    from distributed.protocol.serialize import ToPickle

    spec = BlockSpec(Source.parse(dataset_url), "u", 0.0, BlockGrid(SHAPE, BLOCK), "<f4", 0)
    worker = owner_of(spec, (3, 0, 0, 0), sorted(client.scheduler_info()["workers"]))
    parts = [[[3, 0, 0, 0], [[0, 8], [0, 16], [0, 16]]]]  # the whole block

    async def ask(read):
        rpc = client.rpc(worker)
        await rpc.tierscope_cancel(read="stale")  # a read's cancel may come first: it is remembered
        return await rpc.tierscope_read(spec=ToPickle(spec), parts=parts, load=True, read=read)

    assert client.sync(ask, "stale") == {"parts": None}  # not loaded: nothing fetched, nothing counted
    assert tierscope.stats(client)["total"]["fetches"] == 0 and counts(client) == (0, 0, 0)
    (block,) = client.sync(ask, "fresh")["parts"]  # another id loads as usual
    np.testing.assert_array_equal(block[0], views(time=3, z=slice(0, 8), y=slice(0, 16), x=slice(0, 16)))
    assert tierscope.stats(client)["total"]["fetches"] == 1  # the view was the owner's L1 hit

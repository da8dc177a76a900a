"""Direct reads: views whose blocks sit in their owners' L1 skip the graph (real server, 2-worker cluster)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import tierscope
from tierscope.cache import entry_charge
from tierscope.dask import direct
from tierscope.dask.direct import pieces
from tierscope.grid import BlockGrid

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


def test_a_view_held_in_l1_is_read_without_a_graph(client, views):
    views(time=1, z=slice(0, 16))  # 2 x 2 x 2 blocks: all misses, through the graph
    assert counts(client) == (0, 8, 8)
    views(time=1, z=slice(0, 16))
    assert counts(client) == (8, 8, 8)  # 8 hits, no new load reached the scheduler
    views(time=1, z=3, y=slice(5, 20))  # a new, smaller view inside the held blocks
    assert counts(client) == (12, 8, 8)
    assert tierscope.stats(client)["scheduler"]["views"] == 2  # the direct view still moved the position


def test_a_partly_held_view_counts_each_block_once(client, views):
    views(time=2, z=slice(0, 8))  # 4 blocks
    views(time=2, z=slice(0, 16))  # 4 held, 4 new: the owners of new blocks load them through the graph
    hits, misses, loads = counts(client)
    assert hits + misses == 4 + 8 and misses == 8 and misses <= loads <= 12
    views(time=2, z=slice(0, 16))
    assert counts(client)[:2] == (hits + 8, misses)


def test_without_direct_reads_or_the_handler_every_view_takes_the_graph(client, views):
    tierscope.connect(client, l1="64MiB", l2="128MiB", prefetch="off", direct=False)
    views(time=3, z=slice(8, 16))
    views(time=3, z=slice(8, 16))
    assert counts(client) == (4, 4, 8)

    tierscope.connect(client, l1="64MiB", l2="128MiB", prefetch="off")
    views(time=3, z=slice(8, 16))
    client.run(lambda dask_worker: dask_worker.handlers.pop("tierscope_read") and None)  # an older worker
    views(time=3, z=slice(8, 16))  # no handler answers: the graph serves it, values still exact
    assert counts(client) == (4, 4, 8)
    assert set(direct._enabled[client.id].failed) == set(client.scheduler_info()["workers"])
    views(time=3, z=slice(8, 16))  # failed workers are not asked again for a while: straight to the graph
    assert counts(client) == (8, 4, 12)


def test_a_malformed_view_message_leaves_the_client_connected(client, views):
    from distributed.protocol.serialize import ToPickle

    for msg in ({}, {"spec": ToPickle(3), "box": [[0, 0, 0, 0], [0, 0, 0, 0]]}, {"spec": 3, "box": "x"}):
        client._send_to_scheduler({"op": "tierscope-view", **msg})
    views(time=1, z=slice(0, 8))
    views(time=1, z=slice(0, 8))
    assert client.status == "running" and counts(client) == (4, 4, 4)


def test_a_view_held_in_l2_is_decoded_on_its_owners_without_a_graph(client, views):
    block_nbytes = entry_charge(8 * 16 * 16 * 4)
    tierscope.connect(client, l1=block_nbytes, l2="128MiB", prefetch="off")  # L1: one block per worker
    views(time=0, z=slice(0, 16))  # 8 blocks: all reach L2, at most one per worker stays in L1
    assert counts(client) == (0, 8, 8)
    views(time=0, z=slice(0, 16))
    stats = tierscope.stats(client)["total"]
    assert stats["l2"]["hits"] >= 6 and stats["l1"]["hits"] + stats["l1"]["misses"] == 16
    assert counts(client)[2] == 8 and stats["fetches"] == 8  # no new graph, nothing fetched again

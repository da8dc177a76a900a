"""Block keys on the scheduler, and the worker tiers as seen through tierscope.stats."""

import pytest
import xarray as xr
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

import tierscope
from tierscope.cache import entry_charge
from tierscope.client.source import Source


class KeyRecorder(SchedulerPlugin):
    """Records the task keys of every graph the scheduler receives."""

    name = "key-recorder"

    def __init__(self):
        self.graphs = []

    def update_graph(self, scheduler, *, keys, tasks=None, **kwargs):
        self.graphs.append(list(tasks or ()))


def recorded(dask_scheduler):
    return dask_scheduler.plugins["key-recorder"].graphs


def test_block_load_keys_reach_the_scheduler_unfused(client, dataset_url):
    import dask

    assert dask.config.get("optimization.fuse.active", None) is None  # dask's default configuration
    client.register_plugin(KeyRecorder())
    ds = xr.open_dataset(dataset_url, engine="tierscope")
    with dask.config.set({"tierscope.direct-read.load": False}):  # a cold view takes the graph
        ds.u.isel(time=1, z=slice(4, 12)).values  # blocks t=1, z 0..1, y 0..1, x 0..1
    (keys,) = client.run_on_scheduler(recorded)
    loads = [k for k in keys if isinstance(k, tuple) and str(k[0]).startswith("tierscope-u-")]
    assert {k[1:] for k in loads} == {(1, z, y, x) for z in (0, 1) for y in (0, 1) for x in (0, 1)}
    assert len(loads) == 8 and len({k[0] for k in loads}) == 1
    assert all(len(k) == 5 for k in loads)  # (name, t, z, y, x): one task per whole block


@pytest.fixture
def one_worker():
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


def test_repeated_view_hits_l1_and_l2_hit_avoids_the_server(one_worker, dataset_url):
    block_bytes = entry_charge(8 * 16 * 16 * 4)
    tierscope.connect(one_worker, l1=block_bytes, l2="16MiB", prefetch="off")  # L1 holds one block
    ds = xr.open_dataset(dataset_url, engine="tierscope")
    server = Source.parse(dataset_url).transport()
    view_a = {"time": 0, "z": 0, "y": slice(0, 16), "x": slice(0, 16)}  # one block each
    view_b = {"time": 0, "z": 0, "y": slice(16, 32), "x": slice(0, 16)}

    a = ds.p.isel(view_a).values
    a_again = ds.p.isel(view_a).values
    (worker, stats), = tierscope.stats(one_worker)["workers"].items()
    assert (stats["l1"]["hits"], stats["l1"]["misses"]) == (1, 1)
    assert (a == a_again).all()

    ds.p.isel(view_b).values  # evicts A from L1; A stays in L2
    before = server.server_stats()["requests"]["user"]
    a_from_l2 = ds.p.isel(view_a).values
    after = server.server_stats()["requests"]["user"]
    stats = tierscope.stats(one_worker)["workers"][worker]
    assert stats["l1"]["misses"] == 3 and stats["l1"]["evictions"] == 2
    assert stats["l2"]["hits"] == 1 and stats["l2"]["misses"] == 2
    assert after == before  # decoded from L2: no server request
    assert stats["fetches"] == 2
    assert (a_from_l2 == a).all()
    total = tierscope.stats(one_worker)["total"]
    assert total["l1"]["hit_ratio"] == pytest.approx(1 / 4)


def test_results_are_copies_not_views_into_the_cache(dataset_url):
    tierscope.connect(None, l1="8MiB", l2="8MiB")
    ds = xr.open_dataset(dataset_url, engine="tierscope")
    first = ds.v.isel(time=0, z=0).values
    first[:] = -1
    assert (ds.v.isel(time=0, z=0).values != -1).any()
    local = tierscope.stats()["workers"]["local"]
    assert local["l1"]["hits"] >= 2


@pytest.mark.timeout(60)
def test_block_graph_stays_lazy_for_a_trillion_blocks():
    """2**40 blocks: any code path that enumerates a variable's blocks could never finish."""
    import dask
    import numpy as np

    from tierscope.dask.graph import block_array
    from tierscope.dask.tiers import BlockSpec
    from tierscope.grid import BlockGrid

    grid = BlockGrid((2**10,) * 4, (1,) * 4)
    spec = BlockSpec(Source("http", "http://127.0.0.1:1", "big"), "u", 0.0, grid, "<f4")
    array = block_array(spec, np.dtype("f4"))
    (view,) = dask.optimize(array[7, 3, :4, 5:7])
    loads = [k for k in dict(view.__dask_graph__()) if isinstance(k, tuple) and k[0] == array.name]
    assert sorted(k[1:] for k in loads) == [(7, 3, y, x) for y in range(4) for x in (5, 6)]

"""Prefetch across levels (issue #12): a level-0 view also plans the coarser levels, so that after a jump
anywhere a coarse answer is already in a worker's L1 or L2.

A real block server (prefetch off: every block a user view asks it for is counted there) over a sample
store with levels 0..2, a LocalCluster of 2 worker processes. The grid is 48 x 2 x 4 x 4 blocks of 2 KiB at
level 0, 48 x 1 x 2 x 2 at level 1 and 48 x 1 x 1 x 1 at level 2; a view is one z-block slice of one time
step (16 blocks). Tiers per worker: L1 64 blocks, L2 1024: level 0's own plan (512 blocks) reaches about
16 time steps, the coarse levels' share of L2 holds all of levels 1 and 2, and their share of L1 only
the few blocks nearest the view.
"""

from __future__ import annotations

import math
import sys
import threading
import time

import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

import tierscope
from tierscope.backend import TierscopeDataStore
from tierscope.cache import entry_charge
from tierscope.client.source import Source
from tierscope.dask.coarse import CoarsePlanner, level_box, level_spec
from tierscope.dask.scheduler import THREAD_NAME, Owners, owner_of
from tierscope.grid import BlockGrid
from tierscope.prefetch import Box, around
from tierscope.protocol import BlockSpec

from conftest import wait_for

SHAPE = (48, 16, 32, 32)
BLOCK = (1, 8, 8, 8)
CHARGE = entry_charge(math.prod(BLOCK) * 4, "distance")  # what a tier charges for one block
L1 = 64 * CHARGE
L2 = 1024 * CHARGE
NEAR, FAR = 3, 45  # the views' time steps, and where the jump goes


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from tierscope.store import pyramid, write_sample

    path = write_sample(tmp_path_factory.mktemp("levels") / "walk.zarr", shape=SHAPE, block=BLOCK,
                        variables=("u",), seed=11)
    assert pyramid(path) == 3
    return path


@pytest.fixture(scope="module")
def url(store):
    from tierscope.server import BlockService, ServerThread
    from tierscope.store.origin import ZarrOrigin

    with ServerThread(BlockService([ZarrOrigin(store)])) as running:
        yield f"{running.url}/datasets/walk"


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None) as c:
        yield c


@pytest.fixture
def client(cluster):
    with Client(cluster) as c:
        yield c


def spec_of(url_or_path: str, level: int = 0, variable: str = "u"):
    """The BlockSpec the backend gives a variable's load tasks."""
    store = TierscopeDataStore(Source.parse(url_or_path).level(level), 0.0)
    try:
        array = store.get_variables()[variable]._data
        while not hasattr(array, "spec"):
            array = array.array
        return array.spec
    finally:
        store.close()


def user_requests(url: str) -> int:
    return Source.parse(url).transport().server_stats()["requests"]["user"]


def lookups(client) -> dict[str, int]:
    total = tierscope.stats(client)["total"]
    return {f"{tier}_{k}": total[tier][k] for tier in ("l1", "l2") for k in ("hits", "misses")}


def worker_plans(client) -> int:
    return tierscope.stats(client)["total"]["prefetch"]["plans"]


def read(ds, t: int) -> np.ndarray:
    """One view: the first z-block slice of time step ``t`` (at level 0, 16 blocks; coarser, fewer)."""
    return ds.u.isel(time=t, z=slice(0, 8)).values


def stored(store, level: int, t: int) -> np.ndarray:
    """``read``'s view as the store holds it (level ``level`` is its zarr group)."""
    return xr.open_zarr(store, group=str(level), consolidated=False).u.isel(time=t, z=slice(0, 8)).values


def held(client, spec, indices, tiers=("l1", "l2")) -> bool:
    """Whether every block sits in some worker's L1 or L2 (or the ``tiers`` named)."""
    keys = [spec.block_key(i) for i in indices]

    def has(dask_worker):
        plugin = dask_worker.plugins["tierscope"].tiers
        return [any(k in getattr(plugin, tier) for tier in tiers) for k in keys]

    return all(map(any, zip(*client.run(has).values(), strict=True)))


def test_level_specs_are_the_backends_and_boxes_map_by_elements(url, store):
    level0 = spec_of(url)
    assert (level0.level, level0.levels, level0.level_axes) == (0, 3, (1, 2, 3))
    for k in (1, 2):
        assert level_spec(level0, k) == spec_of(url, k)  # same dataset NAME@k, grid, position key
        assert level_spec(spec_of(url, 1), k) == spec_of(url, k)
    assert level_spec(spec_of(store), 2) == spec_of(store, 2)
    # Partial edge blocks: every element of a box lands in its mapped box, level by level.
    ragged = BlockSpec(level0.source, "u", 0.0, BlockGrid((5, 13, 21, 9), (2, 4, 3, 4)), "<f4", 0,
                       levels=3, level_axes=(1, 2, 3))
    grid = ragged.grid
    for lo, hi in (((0, 0, 0, 0), (2, 3, 6, 2)), ((1, 1, 2, 1), (2, 3, 5, 2)), ((2, 3, 6, 2), (2, 3, 6, 2))):
        box = Box(lo, hi)
        for k in (1, 2):
            coarse = level_spec(ragged, k)
            mapped = level_box(ragged, box, coarse)
            first = [i * b for i, b in zip(box.lo, grid.block, strict=True)]
            last = [min((i + 1) * b, n) - 1 for i, b, n in zip(box.hi, grid.block, grid.shape, strict=True)]
            for corner, got in ((first, mapped.lo), (last, mapped.hi)):
                want = [e // 2**k // cb if a in ragged.level_axes else e // cb
                        for a, (e, cb) in enumerate(zip(corner, coarse.grid.block, strict=True))]
                assert list(got) == want and coarse.grid.check(got)


@pytest.mark.parametrize(("nblocks", "box"), [
    ((30, 1, 1, 1), Box((2, 0, 0, 0), (2, 0, 0, 0))),  # a coarsest level: one block per time step
    ((12, 2, 3, 2), Box((5, 0, 1, 0), (6, 1, 1, 0))),
    ((9, 4, 4, 4), Box((0, 0, 0, 0), (0, 3, 3, 3))),  # the view covers every spatial block
])
def test_around_is_the_box_then_every_shell_nearest_first(nblocks, box):
    grid = BlockGrid(nblocks, (1, 1, 1, 1))
    inside = sorted(i for i in grid.indices() if box.distance(i) == 0)
    shells = sorted((box.distance(i), i) for i in grid.indices() if box.distance(i) > 0)
    for radius, limit in ((3, 10_000), (sum(nblocks), 10_000), (sum(nblocks), 17)):
        want = inside + [i for d, i in shells if d <= radius]
        assert [tuple(i) for i in around(grid, box, radius, limit).tolist()] == want[:limit]


def test_the_coarsest_level_alone_is_decoded_into_l1_within_its_share():
    """The bench's large geometry: 2 GiB of L1 per worker. The coarsest level (1 block per time step)
    is planned decoded, all 16 time steps; the finer coarse levels are L2 only."""
    spec = spec_of("sample://big?shape=16,128,512,512&block=1,64,64,64&levels=3")
    planner, owners = CoarsePlanner(), Owners()
    workers = owners.current(["tcp://a:1", "tcp://b:1"])
    plans = planner.plan("c", spec, Box((5, 0, 0, 0), (5, 0, 7, 7)), dict.fromkeys(workers, 2 << 30),
                         dict.fromkeys(workers, 4 << 30), 0.5, owners.columns)
    decoded = {p.spec.level: sum(d for share in p.shares.values() for _, d in share) for p in plans}
    assert decoded == {3: 16, 2: 0, 1: 0}
    # a small L1 decodes few, nearest first: 1/64 of 2 x 64 MiB is 1 MiB per worker, 3 of the coarsest
    # level's clipped (1, 16, 64, 64) blocks (256 KiB, each charged a little more); one worker owns them all
    small = dict.fromkeys(workers, 64 * spec.block_nbytes)
    plans = CoarsePlanner().plan("c", spec, Box((5, 0, 0, 0), (5, 0, 7, 7)), small,
                                 dict.fromkeys(workers, 4 << 30), 0.5, owners.columns)
    assert plans[0].spec.block_nbytes == 256 << 10
    first = [i for share in plans[0].shares.values() for i, d in share if d]
    assert first == [(5, 0, 0, 0), (4, 0, 0, 0), (6, 0, 0, 0)]


def test_coarse_plans_are_bounded_whatever_the_dataset_size():
    """The same view and tiers on 10^2 and 2 x 10^4 time steps (5 x 10^4 and 10^7 blocks at level 0):
    coarse work per view stays within the cap."""
    enumerated = []
    for nt in (100, 20_000):
        spec = spec_of(f"sample://big?shape={nt},512,512,512&block=1,64,64,64&levels=3")
        assert spec.levels == 4 and spec.grid.nblocks == (nt, 8, 8, 8)
        planner, owners = CoarsePlanner(max_blocks=1024), Owners()
        workers = owners.current(["tcp://a:1", "tcp://b:1"])
        tiers = dict.fromkeys(workers, 64 << 30)  # room for every coarse block: only the cap binds
        plans = planner.plan("c", spec, Box((nt // 2, 2, 0, 0), (nt // 2, 2, 7, 7)), tiers, tiers, 0.5,
                             owners.columns)
        assert [p.spec.level for p in plans] == [3, 2, 1]  # coarsest first
        planned = [sum(len(s) for s in p.shares.values()) for p in plans]
        assert planner.last["max_enumerated"] <= 1024 and sum(planned) <= 1024
        enumerated.append(planner.last["enumerated"])
        if nt == 100:  # the coarsest level (one block per time step) is covered whole
            assert planned[0] == 100
        else:  # the cap bounds it: a window of 512 time steps around the view
            assert planned[0] == 512
            steps = sorted(i[0] for share in plans[0].shares.values() for i, _ in share)
            assert steps == list(range(nt // 2 - 256, nt // 2 + 256))
    assert enumerated[1] <= 1024 and enumerated[0] <= enumerated[1]


def test_after_a_jump_the_coarse_view_comes_from_l1_l2(client, url, store):
    tierscope.connect(client, l1=L1, l2=L2, policy="distance", prefetch="auto")
    ds0 = xr.open_dataset(url, engine="tierscope")
    ds2 = xr.open_dataset(url, engine="tierscope", level=2)
    for t in range(NEAR - 2, NEAR + 1):
        read(ds0, t)
        time.sleep(0.1)
    spec2, spec1 = spec_of(url, 2), spec_of(url, 1)
    level2 = [(t, 0, 0, 0) for t in range(SHAPE[0])]  # one block per time step: all of them
    level1 = [(t, 0, y, x) for t in range(SHAPE[0]) for y in (0, 1) for x in (0, 1)]
    assert wait_for(lambda: held(client, spec2, level2) and held(client, spec1, level1),
                    timeout=60), tierscope.stats(client)["total"]["prefetch"]
    scheduler = tierscope.stats(client)["scheduler"]
    assert scheduler["coarse"]["plans"] >= 2 and scheduler["coarse"]["max_enumerated"] <= 1024
    # Coarse blocks wait in L2 (encoded: cheap); of L1 only the coarsest level (level 2) gets a small
    # share (COARSEST_L1_SHARE, here 1 block per worker), nearest first: the first view's own coarsest
    # block (the next two views stayed within that plan's reach: no new coarse plan).
    assert held(client, spec2, [(NEAR, 0, 0, 0), (FAR, 0, 0, 0)], tiers=("l2",))
    assert wait_for(lambda: held(client, spec2, [(NEAR - 2, 0, 0, 0)], tiers=("l1",)))
    assert not held(client, spec2, [(FAR, 0, 0, 0)], tiers=("l1",))
    assert not held(client, spec1, [(NEAR, 0, y, x) for y in (0, 1) for x in (0, 1)], tiers=("l1",))

    # The jump: the far coarse view is answered from L2, the server is not asked for anything.
    requests, before = user_requests(url), lookups(client)
    np.testing.assert_array_equal(read(ds2, FAR), stored(store, 2, FAR))
    after = lookups(client)
    assert user_requests(url) == requests
    assert after["l2_misses"] == before["l2_misses"]
    assert after["l1_hits"] + after["l2_hits"] - before["l1_hits"] - before["l2_hits"] == 1
    # Level 0 there was out of reach: its exact view is fetched.
    read(ds0, FAR)
    assert user_requests(url) > requests


def test_without_prefetch_the_jump_fetches(client, url):
    tierscope.connect(client, l1=L1, l2=L2, policy="distance", prefetch="off")
    ds0 = xr.open_dataset(url, engine="tierscope")
    ds2 = xr.open_dataset(url, engine="tierscope", level=2)
    for t in range(NEAR - 2, NEAR + 1):
        read(ds0, t)
    requests = user_requests(url)
    read(ds2, FAR)
    assert user_requests(url) == requests + 1
    assert tierscope.stats(client)["scheduler"]["coarse"]["plans"] == 0


def test_a_step_inside_the_same_coarse_block_sends_no_coarse_plan(client, url):
    tierscope.connect(client, l1=L1, l2=L2, policy="distance", prefetch="neighbourhood")
    ds0 = xr.open_dataset(url, engine="tierscope")
    read(ds0, 10)
    assert tierscope.stats(client)["scheduler"]["coarse"]["plans"] == 2  # level 2, then level 1
    sent = 3 * 2  # level 0's plan and the two coarse levels', to 2 workers
    assert wait_for(lambda: worker_plans(client) == sent)
    # z-blocks 0 and 1 of level 0 lie in z-block 0 of levels 1 and 2; one time step is within the reach.
    ds0.u.isel(time=10, z=slice(8, 16)).values
    read(ds0, 11)
    stats = tierscope.stats(client)
    assert stats["scheduler"]["views"] == 3
    assert stats["scheduler"]["coarse"]["plans"] == 2 and stats["scheduler"]["coarse"]["unchanged"] == 4
    assert wait_for(lambda: worker_plans(client) == sent + 2 * 2)  # level 0's own plans only
    time.sleep(0.2)
    assert worker_plans(client) == sent + 2 * 2
    # A jump moves the coarse levels too.
    read(ds0, 40)
    assert tierscope.stats(client)["scheduler"]["coarse"]["plans"] == 4


def test_level0_playback_still_hits_l1(client, url):
    """Coarse plans share the workers' prefetch thread: level 0's next view must still be ready."""
    tierscope.connect(client, l1=L1, l2=L2, policy="distance", prefetch="auto")
    ds0 = xr.open_dataset(url, engine="tierscope")
    per_view = []
    for t in range(20, 32):
        time.sleep(0.1)
        before = lookups(client)
        read(ds0, t)
        after = lookups(client)
        per_view.append((after["l1_hits"] - before["l1_hits"],
                         after["l1_hits"] + after["l1_misses"] - before["l1_hits"] - before["l1_misses"]))
    hits, looks = (sum(v[i] for v in per_view[3:]) for i in (0, 1))
    assert hits >= 0.9 * looks, per_view
    assert tierscope.stats(client)["scheduler"]["coarse"]["plans"] >= 2


PLANNING = ("observe_box", "plan", "around", "_assign")  # moving a position, planning, enumerating blocks


def _watch_planning(dask_scheduler) -> str:
    """On the scheduler's loop: record which threads call the hand-over and the planning functions, on
    the loop's thread and on threads started from now on (the next plugin's planning thread). The
    loop's thread name."""
    from tierscope.dask import coarse
    from tierscope.dask.scheduler import TierscopeSchedulerPlugin
    from tierscope.prefetch import Position, around

    codes = {f.__code__: f.__name__ for f in (TierscopeSchedulerPlugin._on_view, Position.observe_box,
                                               Position.plan, around, coarse._assign)}
    seen = dask_scheduler.tierscope_seen = {}

    def profile(frame, event, arg):  # noqa: ANN001, ANN202 - a profile function's signature
        if event == "call" and frame.f_code in codes:
            seen.setdefault(codes[frame.f_code], set()).add(threading.current_thread().name)

    sys.setprofile(profile)
    threading.setprofile(profile)
    return threading.current_thread().name


def _unwatch_planning(dask_scheduler) -> dict[str, set[str]]:
    sys.setprofile(None)
    threading.setprofile(None)
    return dask_scheduler.tierscope_seen


def test_the_loop_hands_views_over_and_the_planning_thread_plans_them(client, url):
    """The scheduler's loop places a view's loads and hands the view over, nothing more: no position
    moves, no plan, no block of any level is enumerated on it."""
    loop = client.run_on_scheduler(_watch_planning)
    try:
        tierscope.connect(client, l1=L1, l2=L2, policy="distance", prefetch="auto")
        ds0 = xr.open_dataset(url, engine="tierscope")
        for t in (10, 11, 40):
            read(ds0, t)
        stats = tierscope.stats(client)["scheduler"]  # once the planning thread has handed all back
    finally:
        seen = client.run_on_scheduler(_unwatch_planning)
    assert stats["views"] == stats["plans"] == 3
    assert stats["plan_cpu_s"]["count"] == stats["view_cpu_s"]["count"] == 3
    assert stats["coarse"]["plans"] >= 4 and stats["coarse"]["enumerated"] > 0
    assert seen == {"_on_view": {loop}, **dict.fromkeys(PLANNING, {THREAD_NAME})}


def _positions_of(dask_scheduler, client_id: str) -> list[str]:
    from tierscope.dask.scheduler import SCHEDULER_PLUGIN_NAME

    positions = dask_scheduler.plugins[SCHEDULER_PLUGIN_NAME].positions
    return [spec.source.dataset for client, spec in positions if client == client_id]


def test_a_closed_clients_positions_are_forgotten_by_the_planning_thread(cluster, client, url):
    tierscope.connect(client, l1=L1, l2=L2, policy="distance", prefetch="auto")
    with Client(cluster) as other:  # the default client now: the view's graph goes through it
        read(xr.open_dataset(url, engine="tierscope"), 5)
        tierscope.stats(client)  # the planning thread has handed the view back
        assert client.run_on_scheduler(_positions_of, client_id=other.id) == ["walk"]
    assert wait_for(lambda: client.run_on_scheduler(_positions_of, client_id=other.id) == [])

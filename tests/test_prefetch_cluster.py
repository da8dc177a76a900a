"""Position-aware prefetch end to end: a real server, a LocalCluster with 2 worker processes, scripted sessions.

The grid is 24 x 4 x 4 x 4 blocks of 8 KiB; a view is one z-slice of one time step (16 blocks). L1 is sized
so the ball of radius 1 around a view fits the workers' L1 together (80 of 128 blocks) and radius 2 does
not: the plugin must compute that radius and fill exactly the blocks a unit step can reach.
"""

from __future__ import annotations

import os
import random
import time
import urllib.request

import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

import tierscope
from tierscope.cache import entry_charge
from tierscope.client.source import Source
from tierscope.dask.scheduler import owner_of
from tierscope.dask.tiers import BlockSpec
from tierscope.grid import BlockGrid

SHAPE = (24, 32, 64, 64)
BLOCK = (1, 8, 16, 16)
BLOCK_BYTES = entry_charge(8 * 16 * 16 * 4, "distance")  # what a tier charges for one block
L1 = 64 * BLOCK_BYTES  # per worker: 128 blocks in all, radius 1
L2 = 128 * BLOCK_BYTES
THINK_S = 0.1


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from tierscope.store import write_sample

    return write_sample(tmp_path_factory.mktemp("prefetch") / "walk.zarr", shape=SHAPE, block=BLOCK,
                        variables=("u",), seed=7)


@pytest.fixture(scope="module")
def url(store):
    from tierscope.server import BlockService, ServerThread
    from tierscope.store.origin import ZarrOrigin

    with ServerThread(BlockService([ZarrOrigin(store)])) as running:
        yield f"{running.url}/datasets/walk"


@pytest.fixture(scope="module")
def reference(store):
    return xr.open_zarr(store, consolidated=False).u.load()


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None) as c:
        yield c


@pytest.fixture
def client(cluster):
    with Client(cluster) as c:
        yield c


def spec_of_u(url: str) -> BlockSpec:
    """What every load task of ``u`` carries (placement hashes its dataset URL and spatial index)."""
    return BlockSpec(Source.parse(url), "u", 0.0, BlockGrid(SHAPE, BLOCK), "<f4", time_axis=0)


def l1_counts(client) -> tuple[int, int]:
    total = tierscope.stats(client)["total"]["l1"]
    return total["hits"], total["misses"]


def run_session(client, url, reference, views, think=THINK_S):
    """Show each (t, z-block) view after ``think`` seconds; per view, the L1 hits and lookups it caused."""
    ds = xr.open_dataset(url, engine="tierscope")
    per_view = []
    for t, k in views:
        time.sleep(think)
        before = l1_counts(client)
        got = ds.u.isel(time=t, z=slice(8 * k, 8 * k + 8)).values
        np.testing.assert_array_equal(got, reference.isel(time=t, z=slice(8 * k, 8 * k + 8)).values)
        hits, misses = l1_counts(client)
        per_view.append((hits - before[0], hits - before[0] + misses - before[1]))
    return per_view


def hit_ratio(per_view, skip=3):
    hits = sum(h for h, _ in per_view[skip:])
    looks = sum(n for _, n in per_view[skip:])
    return hits / looks


def playback(z=1, steps=12):
    return [(t, z) for t in range(steps)]


def wandering(seed=5, steps=24):
    """A random walk over (t, z) with momentum: keep the last step with p=0.7, else a new unit step."""
    rng = random.Random(seed)
    t, z, step = 10, 1, (1, 0)
    views = [(t, z)]
    for _ in range(steps - 1):
        if rng.random() > 0.7:
            step = rng.choice([(1, 0), (-1, 0), (0, 1), (0, -1)])
        if not (0 <= t + step[0] < SHAPE[0] and 0 <= z + step[1] < SHAPE[1] // BLOCK[1]):
            step = (-step[0], -step[1])
        t, z = t + step[0], z + step[1]
        views.append((t, z))
    return views


def test_playback_session_hits_l1_after_three_views(client, url, reference):
    tierscope.connect(client, l1=L1, l2=L2, policy="distance", prefetch="auto")
    per_view = run_session(client, url, reference, playback())
    assert hit_ratio(per_view) >= 0.9, per_view
    stats = tierscope.stats(client)
    assert stats["scheduler"]["views"] == 12 and stats["scheduler"]["plans"] == 12
    wall, cpu = stats["scheduler"]["view_s"], stats["scheduler"]["view_cpu_s"]
    assert wall["count"] == cpu["count"] == 12 and 0 < cpu["mean_ms"] <= wall["mean_ms"] * 1.05
    loads = stats["scheduler"]["loads"]
    assert stats["scheduler"]["queue"]["count"] == loads  # every graph load's wait for a worker, measured
    assert loads <= 16  # views are read from their owners directly (a slow cold one may take the graph)
    prefetch = stats["total"]["prefetch"]
    assert prefetch["used"] >= 0.9 * 9 * 16 and prefetch["issued"] >= prefetch["used"]
    # Prefetch work is timed apart from the user's loads: most of the decoding happened in the background.
    assert stats["total"]["prefetch_stage_s"]["decode"] > stats["total"]["stage_s"]["decode"] > 0


def test_prefetched_blocks_sit_on_the_worker_that_runs_the_load(client, url, reference):
    tierscope.connect(client, l1=L1, l2=L2, policy="distance", prefetch="playback")
    run_session(client, url, reference, playback(z=2, steps=6))
    workers = sorted(client.scheduler_info()["workers"])
    held = client.run(lambda dask_worker: [k[3] for k in dask_worker.plugins["tierscope"].tiers.l1.keys()])
    spec = spec_of_u(url)
    per_worker = tierscope.stats(client)["workers"]
    for worker, indices in held.items():
        assert indices, f"worker {worker} holds nothing: placement sent every block elsewhere"
        assert all(owner_of(spec, index, workers) == worker for index in indices), (worker, indices)
        assert per_worker[worker]["prefetch"]["used"] > 0  # prefetched here, then loaded here
        # The same figures on the worker's Prometheus endpoint.
        port = client.scheduler_info()["workers"][worker]["services"]["dashboard"]
        host = worker.split("://")[1].rsplit(":", 1)[0]
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
        hits = per_worker[worker]["l1"]["hits"]
        assert f'tierscope_tier_lookups_total{{result="hit",tier="l1",worker="{worker}"}} {float(hits)}' in text
        used = per_worker[worker]["prefetch"]["used"]
        assert f'tierscope_prefetch_blocks_total{{outcome="used",worker="{worker}"}} {float(used)}' in text


def test_wandering_session_hits_l1_most_of_the_time(client, url, reference):
    tierscope.connect(client, l1=L1, l2=L2, policy="distance", prefetch="auto")
    per_view = run_session(client, url, reference, wandering())
    assert hit_ratio(per_view) >= 0.6, per_view


@pytest.mark.parametrize("views", [playback(), wandering()], ids=["playback", "wandering"])
def test_without_prefetch_only_repeats_hit(client, url, reference, views):
    tierscope.connect(client, l1=L1, l2=L2, policy="distance", prefetch="off")
    per_view = run_session(client, url, reference, views, think=0.0)
    seen, repeats = set(), []
    for view in views:
        repeats.append(view in seen)
        seen.add(view)
    for (hits, looks), repeat in zip(per_view, repeats, strict=True):
        assert hits <= (looks if repeat else 0)
    stats = tierscope.stats(client)
    assert stats["total"]["prefetch"]["issued"] == 0 and stats["scheduler"]["plans"] == 0


def _stealable_loads(dask_scheduler):
    steal = dask_scheduler.extensions["stealing"]
    processing = [ts for ts in dask_scheduler.tasks.values() if ts.state == "processing"]
    return len(processing), sum(ts in steal.key_stealable for ts in processing)


def test_block_loads_are_never_offered_to_work_stealing(client, url, reference):
    """Stealing would move a load off its owner, into the wrong worker's L1 (a flaky placement test)."""
    from tierscope.bench.link import LinkProxy
    from tierscope.dask.graph import block_array

    tierscope.connect(client, l1=L1, l2=L2, prefetch="off")
    host, port = url.split("://")[1].split("/")[0].rsplit(":", 1)
    with LinkProxy(host, int(port), 1e9, 0.3) as slow:  # loads wait on the link: long in "processing"
        spec = spec_of_u(f"{slow.url}/datasets/walk")
        future = client.compute(block_array(spec, np.float32)[3, :16])
        deadline = time.monotonic() + 10
        while (seen := client.run_on_scheduler(_stealable_loads))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen[0] > 0 and seen[1] == 0, seen
        np.testing.assert_array_equal(future.result(), reference.isel(time=3, z=slice(0, 16)).values)


def test_a_jump_cancels_the_stale_plan(client, url, reference):
    # Tiers big enough for the whole grid: the first plan is long (512 blocks) and still queued when the
    # user jumps, so the jump's plan must drop the rest of it.
    tierscope.connect(client, l1="64MiB", l2="64MiB", policy="distance", prefetch="neighbourhood")
    run_session(client, url, reference, [(0, 0), (23, 3)], think=0.0)
    stats = tierscope.stats(client)
    assert stats["scheduler"]["plans"] == 2
    assert stats["total"]["prefetch"]["cancelled"] > 0


def test_killing_a_worker_keeps_views_exact_and_moves_ownership(cluster, url, reference):
    with Client(cluster) as client:
        tierscope.connect(client, l1=L1, l2=L2, policy="distance", prefetch="auto")
        run_session(client, url, reference, playback(z=0, steps=4))
        victim = sorted(client.scheduler_info()["workers"])[0]
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, 9)
        deadline = time.monotonic() + 60
        while victim in client.scheduler_info()["workers"] and time.monotonic() < deadline:
            time.sleep(0.1)
        # Views go on while the nanny brings a new worker up; every value stays exact.
        run_session(client, url, reference, [(t, 0) for t in range(4, 10)])
        client.wait_for_workers(2, timeout=60)
        per_view = run_session(client, url, reference, [(t, 3) for t in range(6)])
        assert len(per_view) == 6
        spec = spec_of_u(url)
        held = client.run(lambda dask_worker: [k[3] for k in dask_worker.plugins["tierscope"].tiers.l1.keys()])
        workers = sorted(held)  # the workers that answered: the ones the owners are hashed over now
        assert victim not in workers and len(workers) == 2
        for worker, indices in held.items():
            recent = [i for i in indices if i[1] == 3]
            assert all(owner_of(spec, i, workers) == worker for i in recent)


def test_preload_adds_the_plugin_to_a_cli_style_scheduler():
    kwargs = {"preload": ["tierscope.dask.preload"], "preload_argv": [["--tierscope-prefetch", "playback"]]}
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None, scheduler_kwargs=kwargs) as c, \
            Client(c) as client:
        stats = tierscope.stats(client)
    assert stats["scheduler"]["mode"] == "playback" and stats["scheduler"]["views"] == 0


def test_the_view_reaches_the_block_server_and_its_prefetch_follows(client, store, reference):
    from tierscope.client.source import Source
    from tierscope.server import BlockService, ServerThread
    from tierscope.store.origin import ZarrOrigin

    service = BlockService([ZarrOrigin(store)], l3="4MiB", l4="8MiB", prefetch="playback")
    with ServerThread(service) as server:
        url = f"{server.url}/datasets/walk"
        # No worker prefetch: every view's blocks are user requests, answered from what the server prefetched.
        tierscope.connect(client, l1=L1, l2=L2, prefetch="off")
        run_session(client, url, reference, playback(z=3, steps=8))
        stats = Source.parse(url).transport().server_stats()
    assert stats["sessions"] == 1  # both workers speak for the client's one session
    assert stats["requests"]["user"] == 8 * 16
    assert stats["served_by"]["l3"] >= 0.75 * 6 * 16, stats["served_by"]  # views 2.. came from L3
    assert stats["prefetch"]["used"] > 0


def test_workers_sharing_a_process_each_get_tiers_and_metrics(url, reference):
    from prometheus_client import generate_latest

    with LocalCluster(n_workers=2, processes=False, dashboard_address=None) as c, Client(c) as client:
        tierscope.connect(client, l1=L1, l2=L2, prefetch="auto")
        run_session(client, url, reference, playback(z=1, steps=3))
        per_worker = tierscope.stats(client)["workers"]
        text = generate_latest().decode()
    assert len(per_worker) == 2
    for worker, stats in per_worker.items():
        misses = float(stats["l1"]["misses"])
        assert f'tierscope_tier_lookups_total{{result="miss",tier="l1",worker="{worker}"}} {misses}' in text

"""Per-session state stays within its caps whatever clients do (issue: petabyte-shaped datasets)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import aiohttp
import pytest
from distributed import Client

import tierscope
from tierscope.client.source import Source
from tierscope.dask import direct, prefetcher
from tierscope.dask.prefetcher import Plan, Prefetcher
from tierscope.dask.tiers import BlockSpec, WorkerTiers
from tierscope.grid import BlockGrid
from tierscope.server import BlockService, ServerThread
from tierscope.server.sessions import PrefetchItem, PrefetchQueue
from tierscope.store.origin import ZarrOrigin

from conftest import BLOCK, SHAPE


def items(n: int, tol: float = 0.0) -> list[PrefetchItem]:
    return [PrefetchItem("d", "u", (i, 0, 0, 0), tol, "lorenzo", True) for i in range(n)]


def test_queue_drops_the_oldest_plans_past_its_cap():
    queue = PrefetchQueue(ttl=60.0, max_items=100)
    for k in range(10):
        assert queue.replace(("s", k), items(30)) == 0
        assert len(queue) <= 100
    assert len(queue) == 90 and queue.expired == 7 * 30
    assert queue.replace(("s", 0), ()) == 0  # the oldest whole plans went first
    assert queue.replace(("s", 9), ()) == 30  # replacing a plan drops (and returns) its remainder


def test_queue_drops_plans_older_than_their_ttl():
    async def scenario() -> tuple[int, int, PrefetchItem]:
        queue = PrefetchQueue(ttl=0.05, max_items=1000)
        queue.replace("old", items(20))
        await asyncio.sleep(0.1)
        queue.replace("new", items(5, tol=1.0))
        first = await queue.get()  # the old plan is skipped unserved
        return len(queue), queue.expired, first

    left, expired, first = asyncio.run(scenario())
    assert (left, expired, first.tol) == (4, 20, 1.0)


def test_worker_prefetcher_remembers_a_bounded_number_of_positions(sample_store, monkeypatch):
    monkeypatch.setattr(prefetcher, "MAX_POSITIONS", 8)
    spec = BlockSpec(Source.parse(sample_store), "u", 0.0, BlockGrid(SHAPE, BLOCK), "<f4")
    running = Prefetcher(WorkerTiers(1 << 20, 1 << 20))
    try:
        for session in range(50):
            running.submit(Plan(1, f"s{session}", spec, ((0, 0, 0, 0), (0, 0, 0, 0)), (), ()))
        assert len(running._epochs) == 8
        assert running.stats()["plans"] == 50
    finally:
        running.close()


def test_a_closed_client_leaves_the_direct_read_table(cluster):
    with Client(cluster) as first:
        tierscope.connect(first, l1="16MiB", l2="16MiB", prefetch="off")
        assert first.id in direct._enabled
    with Client(cluster) as second:
        tierscope.connect(second, l1="16MiB", l2="16MiB", prefetch="off")
        assert first.id not in direct._enabled and second.id in direct._enabled


def stats(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/stats") as response:
        return json.load(response)


async def flood(url: str, requests: int, concurrency: int = 8) -> list[int]:
    """``requests`` block requests, each with a tol and a session of its own."""
    statuses: list[int] = []
    todo = iter(range(requests))

    async def one_client(http: aiohttp.ClientSession) -> None:
        for i in todo:
            index = f"{i % 4}.{i % 2}.{(i // 2) % 2}.{(i // 4) % 2}"
            headers = {"X-Tierscope-Session": f"flood-{i}", "X-Tierscope-Position": index}
            params = {"tol": repr(1e-3 * (1 + i * 1e-6))}
            async with http.get(f"{url}/datasets/turb/blocks/u/{index}", params=params,
                                headers=headers) as r:
                await r.read()
                statuses.append(r.status)

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(one_client(http) for _ in range(concurrency)))
    return statuses


def test_a_flood_of_tols_and_sessions_stays_within_the_caps(sample_store):
    service = BlockService([ZarrOrigin(sample_store)], l3="8MiB", l4="8MiB", policy="distance",
                           prefetch="auto", max_positions=32, plan_ttl=0.3)
    with ServerThread(service) as server:
        statuses = asyncio.run(flood(server.url, 600))
        during = stats(server.url)
        time.sleep(0.5)  # every plan is past its ttl now
        after = stats(server.url)
    assert statuses == [200] * 600
    assert during["sessions"] == after["sessions"] == 32
    prefetch = after["prefetch"]
    assert prefetch["queued"] == 0 and prefetch["planned"] > 0
    # every planned block was loaded, found held, replaced by a newer plan, or dropped unserved
    done = prefetch["issued"] + prefetch["skipped"] + prefetch["cancelled"] + prefetch["expired"]
    assert done == prefetch["planned"]
    tiers = after["tiers"]
    assert tiers["l3"]["nbytes"] <= 8 << 20 and tiers["l4"]["nbytes"] <= 8 << 20


@pytest.mark.parametrize("header", ["0.0.0.0", ";".join(["0.0.0.0", "1.1.1.1"] * 32)])
def test_position_headers_up_to_the_limit_are_served(server, header):
    request = urllib.request.Request(f"{server.url}/datasets/turb/blocks/u/0.0.0.0",
                                     headers={"X-Tierscope-Position": header})
    with urllib.request.urlopen(request) as response:
        assert response.status == 200


def test_worker_tiers_remember_a_bounded_number_of_views(sample_store, monkeypatch):
    from tierscope.dask import tiers as tiers_module

    monkeypatch.setattr(tiers_module, "MAX_VIEWS", 4)
    tiers = WorkerTiers(1 << 20, 1 << 20, policy="distance")
    for tol in range(20):  # each tol is a variable view of its own
        spec = BlockSpec(Source.parse(sample_store), "u", float(tol), BlockGrid(SHAPE, BLOCK), "<f4")
        tiers.set_view("s", spec, ((0, 0, 0, 0), (0, 0, 1, 1)))
    assert len(tiers._views) == 4 and [k[2] for k in tiers._views] == [16.0, 17.0, 18.0, 19.0]

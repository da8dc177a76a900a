"""Close tols share frames on the block server: a frame at a tighter tol within ``CLOSE`` x the asked one
answers it (no encode, no L3 entry of its own), so a flood of nearly equal tols encodes each block once.
Real server on loopback, real requests."""

from __future__ import annotations

import asyncio
import itertools

import aiohttp
import numpy as np
import pytest
import zarr

from tierscope import codec
from tierscope.client.http import HttpTransport
from tierscope.server import BlockService, ServerThread
from tierscope.server.sessions import PrefetchItem
from tierscope.store.origin import ZarrOrigin

from conftest import BLOCK, SHAPE, wait_for

NBLOCKS = tuple(s // b for s, b in zip(SHAPE, BLOCK, strict=True))
BLOCKS = list(itertools.product(*map(range, NBLOCKS)))


@pytest.fixture(scope="module")
def values(sample_store):
    """The stored values of ``u``, block by block."""
    array = zarr.open_group(sample_store, mode="r")["u"]
    return {index: array.get_block_selection(index) for index in BLOCKS}


@pytest.fixture
def transport():
    """A transport per test, whichever server it talks to (``fetch`` passes the base URL)."""
    transports: dict[str, HttpTransport] = {}

    def fetch(url, index, tol, **kwargs):
        return transports.setdefault(url, HttpTransport(url)).fetch("turb", "u", index, tol, **kwargs)

    yield fetch
    for each in transports.values():
        each.close()


def assert_within(frame: bytes, expected: np.ndarray, tol: float) -> None:
    assert np.abs(codec.decode(frame).astype(np.float64) - expected).max() <= tol


async def flood(url: str, tols: list[float]) -> list[tuple[tuple[int, ...], float, bytes]]:
    """One request per tol, each for a block of its own and from a session of its own, 8 at a time."""
    todo, answers = iter(enumerate(tols)), []

    async def one_client(http: aiohttp.ClientSession) -> None:
        for i, tol in todo:
            index = BLOCKS[i * 7 % len(BLOCKS)]
            headers = {"X-Tierscope-Session": f"flood-{i}"}
            async with http.get(f"{url}/datasets/turb/blocks/u/{'.'.join(map(str, index))}",
                                params={"tol": repr(tol)}, headers=headers) as r:
                assert r.status == 200, await r.text()
                answers.append((index, tol, await r.read()))

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(one_client(http) for _ in range(8)))
    return answers


def test_a_flood_of_close_tols_encodes_each_block_once(sample_store, values, transport):
    service = BlockService([ZarrOrigin(sample_store)], l3="16MiB", l4="16MiB", prefetch="auto")
    with ServerThread(service) as server:
        transport(server.url, BLOCKS[0], 1e-3)  # the tightest tol comes first: the others are close to it
        answers = asyncio.run(flood(server.url, [1e-3 * (1 + i * 1e-6) for i in range(1, 400)]))
        assert wait_for(lambda: service.stats()["prefetch"]["queued"] == 0)
        stats = service.stats()
    for index, tol, frame in answers:
        assert_within(frame, values[index], tol)
        assert codec.read_header(frame).tol == 1e-3
    # every block of u was asked or prefetched, each read and encoded once, held once in L3 and in L4
    assert stats["encodes"] == stats["origin_reads"] == len(BLOCKS)
    assert stats["tiers"]["l3"]["blocks"] == stats["tiers"]["l4"]["blocks"] == len(BLOCKS)


def test_a_close_tighter_frame_answers_a_looser_request_and_a_far_one_does_not(sample_store, values,
                                                                                transport):
    service = BlockService([ZarrOrigin(sample_store)], l3="16MiB", l4="16MiB")
    index = (1, 0, 1, 0)
    with ServerThread(service) as server:
        for tol, tier, served_at, encodes in [
            (0.01, "origin", 0.01, 1),
            (0.015, "l3", 0.01, 1),  # within [tol / 2, tol]: the cached frame, nothing encoded
            (0.02, "l3", 0.01, 1),
            (0.009, "l4", 0.009, 2),  # tighter than every frame held: encoded at its own tol
            (0.021, "l4", 0.021, 3),  # 0.01 is more than twice as fine: encoded at its own tol
        ]:
            fetched = transport(server.url, index, tol)
            assert (fetched.tier, codec.read_header(fetched.frame).tol) == (tier, served_at)
            assert_within(fetched.frame, values[index], tol)
            assert service.stats()["encodes"] == encodes
        assert service.stats()["tiers"]["l3"]["blocks"] == 3


def test_prefetch_skips_blocks_held_at_a_close_tighter_tol(sample_store, transport):
    service = BlockService([ZarrOrigin(sample_store)], l3="16MiB", l4="16MiB", prefetch="neighbourhood")
    with ServerThread(service) as server:
        transport(server.url, BLOCKS[0], 0.012, purpose="prefetch")  # 0.012 is remembered; nothing planned
        for index in BLOCKS:  # every block at 0.01, each in a session of its own (nothing left to plan)
            transport(server.url, index, 0.01, session="s" + ".".join(map(str, index)), position=[index])
        assert wait_for(lambda: service.stats()["prefetch"]["queued"] == 0)
        held = service.stats()
        # at 0.015 the loosest close tol is 0.012: its plan's blocks are all held at 0.01, close to 0.012
        fetched = transport(server.url, (1, 1, 1, 1), 0.015, session="viewer", position=[(1, 1, 1, 1)])
        assert codec.read_header(fetched.frame).tol == 0.01
        assert wait_for(lambda: service.stats()["prefetch"]["queued"] == 0)
        prefetch = service.stats()["prefetch"]
    assert held["encodes"] == len(BLOCKS) + 1
    assert service.stats()["encodes"] == held["encodes"]
    planned = prefetch["planned"] - held["prefetch"]["planned"]
    assert planned > 0 and prefetch["skipped"] - held["prefetch"]["skipped"] == planned
    assert prefetch["issued"] == held["prefetch"]["issued"]


def test_a_plan_of_held_blocks_is_skipped_one_block_per_turn_of_the_loop(sample_store, transport):
    service = BlockService([ZarrOrigin(sample_store)], l3="16MiB", l4="16MiB", prefetch_workers=1)
    with ServerThread(service) as server:
        for index in BLOCKS:
            transport(server.url, index, 0.01)
        plan = [PrefetchItem("turb", "u", index, 0.01, "lorenzo", True) for index in BLOCKS]

        async def queue_and_look() -> tuple[int, int]:
            seen = []
            service.queue.replace(("s", "turb", "u", 0.01), plan)
            asyncio.get_running_loop().call_soon(lambda: seen.append(service.stats()["prefetch"]["skipped"]))
            while len(service.queue):
                await asyncio.sleep(0.01)
            return seen[0], service.stats()["prefetch"]["skipped"]

        during, after = asyncio.run_coroutine_threadsafe(queue_and_look(), server._loop).result(10)
    assert after == len(BLOCKS)  # every block was held
    assert during <= 1  # the callback queued behind the plan ran after one skip, not after the plan

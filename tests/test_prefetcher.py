"""A worker's Prefetcher on its own: real tiers over the embedded transport on a real store."""

from __future__ import annotations

import threading
import time

import dask
import numpy as np
import pytest

from tierscope.client.source import Source
from tierscope.dask.prefetcher import Plan, Prefetcher
from tierscope.dask.tiers import BlockSpec, WorkerTiers
from tierscope.grid import BlockGrid

from conftest import BLOCK, SHAPE

BLOCKS = [(t, z, y, x) for t in range(4) for z in range(2) for y in range(2) for x in range(2)]


@pytest.fixture
def spec(sample_store):
    return BlockSpec(Source.parse(sample_store), "u", 0.0, BlockGrid(SHAPE, BLOCK), "<f4")


@pytest.fixture
def tiers():
    return WorkerTiers(64 << 20, 64 << 20)


@pytest.fixture
def prefetcher(tiers):
    running = Prefetcher(tiers)
    yield running
    running.close()


def plan(spec, epoch, blocks, decode=True, session="s"):
    return Plan(epoch, session, spec, view=((0, 0, 0, 0),), blocks=tuple(blocks),
                decode=(decode,) * len(blocks))


def wait_idle(prefetcher, blocks, timeout=30.0):
    """Until every one of the ``blocks`` submitted blocks is loaded, skipped, cancelled or failed."""
    deadline = time.monotonic() + timeout
    while True:
        stats = prefetcher.stats()
        if sum(stats[k] for k in ("issued", "skipped", "cancelled", "failed")) >= blocks:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.01)


def test_plan_fills_l1_and_user_loads_then_hit(prefetcher, tiers, spec):
    prefetcher.submit(plan(spec, 1, BLOCKS[:4]))
    wait_idle(prefetcher, 4)
    assert prefetcher.stats()["issued"] == 4
    for index in BLOCKS[:4]:
        block = tiers.load(spec, index)
        assert block.flags.writeable  # a private copy, never the cached array
    assert tiers.l1.stats.hits == 4 and tiers.l1.stats.misses == 0
    assert tiers.l1.stats.prefetch_used == 4 and tiers.fetches == 4


def test_l2_only_blocks_are_not_decoded(prefetcher, tiers, spec):
    prefetcher.submit(plan(spec, 1, BLOCKS[:3], decode=False))
    wait_idle(prefetcher, 3)
    assert len(tiers.l2) == 3 and len(tiers.l1) == 0


def test_an_empty_share_moves_the_position_and_the_thread_lives_on(prefetcher, tiers, spec):
    prefetcher.submit(plan(spec, 1, []))
    prefetcher.submit(plan(spec, 2, BLOCKS[:2]))
    wait_idle(prefetcher, 2)
    assert prefetcher.stats()["issued"] == 2 and prefetcher._thread.is_alive()


def test_a_newer_plan_cancels_the_queued_rest_and_stale_plans_are_dropped(prefetcher, tiers, spec):
    tiers.user_idle.clear()  # a user load is running: the prefetcher must wait before each batch
    prefetcher.submit(plan(spec, 5, BLOCKS[:10]))
    time.sleep(0.1)
    assert prefetcher.queued() == 10  # nothing leaves the queue while users load
    prefetcher.submit(plan(spec, 6, BLOCKS[20:22]))
    prefetcher.submit(plan(spec, 4, BLOCKS[30:32]))  # an older epoch arriving late
    stats = prefetcher.stats()
    assert stats["cancelled"] == 10 + 2 and stats["queued"] == 2
    tiers.user_idle.set()
    wait_idle(prefetcher, 10 + 2 + 2)
    assert not {spec.block_key(i) for i in BLOCKS[:10] + BLOCKS[30:32]} & set(tiers.l1.keys())
    assert {spec.block_key(i) for i in BLOCKS[20:22]} <= set(tiers.l1.keys())


def server_counts(spec):
    stats = spec.source.transport().server_stats()
    return stats["batches"], stats["requests"]["prefetch"]


def test_a_batch_is_one_round_trip_and_ends_where_decoding_does(prefetcher, tiers, spec):
    blocks = BLOCKS[:5]
    before = server_counts(spec)
    prefetcher.submit(Plan(1, "s", spec, view=((0, 0, 0, 0),), blocks=tuple(blocks),
                           decode=(True, True, True, False, False)))
    assert wait_idle(prefetcher, 5)["issued"] == 5
    batches, requests = server_counts(spec)
    assert (batches - before[0], requests - before[1]) == (2, 5)
    assert sorted(tiers.l1.keys()) == sorted(spec.block_key(i) for i in blocks[:3])
    assert len(tiers.l2) == 5 and tiers.fetches == 5


def test_batches_hold_at_most_batch_bytes_of_decoded_blocks(prefetcher, tiers, spec):
    before = server_counts(spec)
    with dask.config.set({"tierscope.prefetch-batch.bytes": 3 * spec.block_nbytes}):
        prefetcher.submit(plan(spec, 1, BLOCKS[:7]))
        wait_idle(prefetcher, 7)
    assert server_counts(spec)[0] - before[0] == 3  # 3 + 3 + 1 blocks


def test_positions_take_turns(prefetcher, tiers, spec):
    batches = []
    load = tiers.prefetch
    tiers.prefetch = lambda s, blocks: batches.append(blocks[0][0]) or load(s, blocks)
    tiers.user_idle.clear()
    prefetcher.submit(plan(spec, 1, BLOCKS[:12], session="a"))
    prefetcher.submit(plan(spec, 1, BLOCKS[12:24], session="b"))
    tiers.user_idle.set()
    assert wait_idle(prefetcher, 24)["issued"] == 24
    assert batches == [BLOCKS[0], BLOCKS[12], BLOCKS[8], BLOCKS[20]]  # batches of 8: a, b, a, b


def test_blocks_bound_for_l1_go_before_l2_only_ones_of_any_position(prefetcher, tiers, spec):
    """A coarse level's wide L2-only plan must not delay another position's next view (bound for L1)."""
    batches = []
    load = tiers.prefetch
    tiers.prefetch = lambda s, blocks: batches.append((blocks[0][0], blocks[0][1])) or load(s, blocks)
    tiers.user_idle.clear()
    prefetcher.submit(plan(spec, 1, BLOCKS[:16], decode=False, session="wide"))
    prefetcher.submit(Plan(1, "next", spec, view=((0, 0, 0, 0),), blocks=tuple(BLOCKS[16:32]),
                           decode=(True,) * 8 + (False,) * 8))
    tiers.user_idle.set()
    assert wait_idle(prefetcher, 32)["issued"] == 32
    assert batches == [(BLOCKS[16], True), (BLOCKS[0], False), (BLOCKS[24], False), (BLOCKS[8], False)]


def test_a_coarsest_levels_blocks_bound_for_l1_go_first(prefetcher, tiers, spec):
    """A progressive view's first part comes from the coarsest level: its few decodes go before level 0's
    (whose L1-bound plans, renewed each view, would otherwise keep them waiting), L2-only ones after."""
    from dataclasses import replace

    level0, coarsest = replace(spec, levels=3), replace(spec, level=2, levels=3)
    batches = []
    load = tiers.prefetch
    tiers.prefetch = lambda s, blocks: batches.append((s.level, blocks[0][0])) or load(s, blocks)
    tiers.user_idle.clear()
    prefetcher.submit(plan(level0, 1, BLOCKS[:16]))
    prefetcher.submit(plan(coarsest, 1, BLOCKS[16:24], decode=False, session="wide"))
    prefetcher.submit(plan(coarsest, 1, BLOCKS[24:32]))
    tiers.user_idle.set()
    assert wait_idle(prefetcher, 32)["issued"] == 32
    assert batches == [(2, BLOCKS[24]), (0, BLOCKS[0]), (0, BLOCKS[8]), (2, BLOCKS[16])]


def test_user_loads_and_prefetch_share_one_fetch_per_block(prefetcher, tiers, spec):
    prefetcher.submit(plan(spec, 1, BLOCKS))
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(tiers.load(spec, i))) for i in BLOCKS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = wait_idle(prefetcher, len(BLOCKS))
    assert stats["issued"] + stats["skipped"] == len(BLOCKS)
    assert tiers.fetches == len(BLOCKS)  # every block crossed the transport once
    assert all(isinstance(r, np.ndarray) for r in results)

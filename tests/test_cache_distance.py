"""The distance policy's index: the order by definition, work per insert, and charges against real memory."""

import gc
import itertools
import random
import threading
import tracemalloc

import numpy as np
import pytest

from tierscope import cache as cache_module
from tierscope.cache import ENTRY_OVERHEAD, INDEX_OVERHEAD, TierCache, Views, entry_charge, nbytes_of
from tierscope.client.source import Source
from tierscope.dask.tiers import BlockSpec, WorkerTiers
from tierscope.grid import BlockGrid
from tierscope.prefetch import Box
from tierscope.server.sessions import MAX_VIEWS, Sessions

URL, VARIABLE, TOL = "http://127.0.0.1:9/datasets/turb", "u", 0.001
GROUP = (URL, VARIABLE, TOL)  # a worker tier's distance group: the block key without its index


def block_key(index):
    """A worker's block key (dataset URL, variable, tol, block index)."""
    return (URL, VARIABLE, TOL, tuple(index))


def tier(entries, value, policy="distance"):
    """A tier holding ``entries`` entries of ``value``'s size, its distance told by ``views[GROUP]``."""
    indexed = policy == "distance"
    cache = TierCache(entries * (nbytes_of(value) + ENTRY_OVERHEAD + indexed * INDEX_OVERHEAD),
                      "l2", policy=policy)
    views = {}
    cache.set_distance(lambda key: (key[:3], key[3]), views.get)
    return cache, views


def look_at(cache, views, group, boxes, time_axis=0):
    views[group] = Views(boxes, time_axis)
    cache.moved(group)


@pytest.mark.parametrize("time_axis", [0, 2, None])
def test_views_hops_are_the_hops_to_the_nearest_box(time_axis):
    rng = np.random.default_rng(1)
    boxes = []
    for _ in range(5):
        lo = rng.integers(0, 20, 4)
        boxes.append((tuple(lo.tolist()), tuple((lo + rng.integers(0, 4, 4)).tolist())))
    views = Views(boxes, time_axis)
    indices = rng.integers(0, 30, (300, 4))
    want = [min(Box(lo, hi).distance(i, time_axis) for lo, hi in boxes) for i in indices.tolist()]
    assert views.hops(indices.T.astype(np.int32)).tolist() == want
    assert [views.hops_of(i) for i in indices.tolist()] == want


def random_boxes(rng, count, spread=10):
    boxes = []
    for _ in range(count):
        lo = rng.integers(0, spread, 4)
        boxes.append((lo.tolist(), (lo + rng.integers(0, 3, 4)).tolist()))
    return boxes


@pytest.mark.parametrize("time_axis", [0, 2, None])
def test_views_drift_bounds_how_far_any_blocks_hops_move(time_axis):
    """Boxes moved a little, added and dropped: no block's hops change by more than the drift; one box
    moved alone along one axis changes some block's hops by all of it."""
    rng = np.random.default_rng(2)
    grid = np.indices((16,) * 4).reshape(4, -1).astype(np.int32) - 3
    for _ in range(40):
        old = random_boxes(rng, rng.integers(1, 5))
        new = [(np.add(lo, step).tolist(), np.add(hi, step).tolist())
               for (lo, hi), step in zip(old, rng.integers(-2, 3, (len(old), 4)), strict=True)]
        new = new[rng.integers(0, 2):] + random_boxes(rng, rng.integers(0, 2))  # one dropped, one added
        if not new:
            continue
        a, b = Views(old, time_axis), Views(new, time_axis)
        assert np.abs(a.hops(grid) - b.hops(grid)).max() <= a.drift(b) == b.drift(a) < np.inf
    one = Views([((2, 2, 2, 2), (3, 3, 3, 3))], time_axis)
    moved = Views([((2, 2, 4, 2), (3, 3, 5, 3))], time_axis)
    assert one.drift(moved) == np.abs(one.hops(grid) - moved.hops(grid)).max() == 2
    assert one.drift(Views([((2, 2, 2, 2), (3, 3, 3, 3))], 1)) == np.inf  # another time axis
    assert one.drift(Views([((2, 2, 2), (3, 3, 3))], time_axis)) == np.inf  # another grid


class Model:
    """The distance policy by definition: the most hops from the views first, ties least recent first."""

    def __init__(self, capacity, charge):
        self.capacity, self.charge, self.keys, self.views = capacity, charge, [], {}
        self._hops = {}

    def look_at(self, group, views):
        self.views[group] = views
        self._hops.clear()

    def hops(self, key):
        if key not in self._hops:
            views = self.views.get(key[:3])
            self._hops[key] = float("inf") if views is None else min(
                box.distance(key[3], views.time_axis) for box in views.boxes)
        return self._hops[key]

    def touch(self, key):
        self.keys.remove(key)
        self.keys.append(key)

    def insert(self, key):
        while (len(self.keys) + 1) * self.charge > self.capacity:
            hops = [self.hops(k) for k in self.keys]  # max() keeps the first of equals: the least recent
            self.keys.pop(max(range(len(self.keys)), key=lambda i: hops[i]))
        self.keys.append(key)


@pytest.mark.parametrize("seed", range(6))
def test_eviction_order_is_the_brute_force_order(seed, monkeypatch):
    """Random inserts, hits, prefetch hits and view moves on three variables: one view box, many boxes,
    none; half the seeds compute the hops of blocks added since a ranking with NumPy, half in Python;
    seeds 3-5 move each box by a step at most (the rankings after a move rank part of the tier)."""
    if seed % 2:
        monkeypatch.setattr(cache_module, "FEW_HOPS", 0)
    rng = random.Random(seed)
    value = bytes(100)
    entries = 150  # more than MIN_CANDIDATES: rankings keep only some candidates
    cache, views = tier(entries, value)
    model = Model(cache.capacity, nbytes_of(value) + ENTRY_OVERHEAD + INDEX_OVERHEAD)
    groups = [("one", "u", 0.0), ("many", "u", 0.0), ("none", "u", 0.0)]

    def move(group):
        if group[0] == "none":
            return
        boxes = []
        for _ in range(1 if group[0] == "one" else 12):
            lo = [rng.randrange(6) for _ in range(4)]
            boxes.append((lo, [c + rng.randrange(2) for c in lo]))
        if seed >= 3 and group in views:
            steps = [[rng.randrange(-1, 2) for _ in range(4)] for _ in views[group].boxes]
            boxes = [(np.add(box.lo, step).tolist(), np.add(box.hi, step).tolist())
                     for box, step in zip(views[group].boxes, steps, strict=True)]
        look_at(cache, views, group, boxes)
        model.look_at(group, views[group])

    for group in groups:
        move(group)
    for _ in range(2500):
        roll = rng.random()
        if roll < 0.04:
            move(rng.choice(groups))
            continue
        group = rng.choice(groups)
        key = (*group, tuple(rng.randrange(7) for _ in range(4)))
        prefetch = rng.random() < 0.3
        if key in model.keys:
            model.touch(key)
        else:
            model.insert(key)
        cache.get_or_load(key, lambda: value, prefetch=prefetch)
        assert cache.keys() == model.keys
    assert cache.rank_stats["reranks"] > 20


def fill_around(entries, inserts, extent, rng):
    """A full distance tier of ``entries`` tiny frames, the view fixed at the centre of a grid of
    ``extent`` blocks a side, then ``inserts`` more blocks anywhere in it. Returns the work per insert."""
    cache, views = tier(entries, bytes(100))
    mid = extent // 2
    look_at(cache, views, GROUP, [((mid, mid, mid, mid), (mid, mid + 1, mid + 1, mid + 1))])
    while len(cache) < entries:
        cache.get_or_load(block_key(rng.integers(0, extent, 4)), lambda: bytes(100))
    before = dict(cache.rank_stats)
    evictions = cache.stats.evictions
    for index in rng.integers(0, extent, (inserts, 4)):
        cache.get_or_load(block_key(index), lambda: bytes(100))
    assert cache.stats.evictions - evictions > inserts // 2  # the tier was full: most inserts evicted
    return {k: (cache.rank_stats[k] - before[k]) / inserts for k in before}


def test_blocks_ranked_per_insert_do_not_grow_with_the_tier_or_the_dataset():
    """With the view still, an insert ranks a bounded number of blocks, whatever the tier's size (the old
    policy ranked every cached block on every insert) and whatever the dataset's."""
    rng = np.random.default_rng(0)
    for n in (100, 1000, 10_000):  # about 1 + 4 (a ranking each n/4 inserts) at any size
        per_insert = fill_around(n, 3 * n, 64, rng)
        assert per_insert["ranked"] <= 6, (n, per_insert)
    huge = fill_around(1000, 3000, 100_000, rng)  # 10^20 blocks instead of 64^4
    assert huge["ranked"] <= 6, huge


def playback(entries):
    """A full tier of ``entries`` tiny frames and its player: each call moves the view to the next time
    step and inserts that step's 64 blocks, and returns the step."""
    cache, views = tier(entries, bytes(100))
    steps = itertools.count()

    def play():
        step = next(steps)
        look_at(cache, views, GROUP, [((step, 0, 0, 0), (step, 0, 7, 7))])
        for y in range(8):
            for x in range(8):
                cache.get_or_load(block_key((step, 0, y, x)), lambda: bytes(100))
        return step

    while len(cache) < entries:
        play()
    return cache, play


def test_a_view_move_costs_one_ranking_of_the_tier_not_one_per_insert():
    """Playback: the view moves one time step each 64 inserts, which are that step's blocks."""
    entries = 4096
    cache, play = playback(entries)
    before = dict(cache.rank_stats)
    for _ in range(100):
        step = play()
    reranks = cache.rank_stats["reranks"] - before["reranks"]
    ranked = cache.rank_stats["ranked"] - before["ranked"]
    assert reranks <= 100  # one per move
    assert ranked <= 100 * (entries + 64)  # each a pass over the tier, plus each insert's own block
    assert [k[3][0] for k in cache.keys()][:64] == [step + 1 - entries // 64] * 64  # oldest step left


def test_a_small_move_ranks_the_blocks_near_the_top_however_large_the_tier():
    """After the first eviction (which ranks every block), each one-step move ranks the 4 steps nearest
    the top and each insert its own block: 320 blocks at 4096 entries and at 32768."""
    ranked = {}
    for entries in (4096, 32768):
        cache, play = playback(entries)
        play()
        before = cache.rank_stats["ranked"]
        for _ in range(50):
            step = play()
        ranked[entries] = (cache.rank_stats["ranked"] - before) / 50
        assert [k[3][0] for k in cache.keys()][:64] == [step + 1 - entries // 64] * 64
    assert ranked == {4096: 4 * 64 + 64, 32768: 4 * 64 + 64}


def test_evictions_after_moves_and_hits_follow_the_brute_force_order():
    """The view steps on or jumps back; blocks are looked up (each then the most recent) before and after
    each move; then 10 to 300 new blocks in the view each evict the farthest block, ties least recent
    first, as computed here from the definition."""
    rng = random.Random(5)
    entries = 3000
    cache, views = tier(entries, bytes(100))
    recency = {}  # the tier's keys, least recent first
    fresh = itertools.count()

    def look(step):
        look_at(cache, views, GROUP, [((step, 0, 0, 0), (step, 10**6, 7, 7))])  # a block's hops: |t - step|

    def insert(step):
        key = block_key((step, next(fresh), rng.randrange(8), rng.randrange(8)))
        cache.get_or_load(key, lambda: bytes(100))
        recency[key] = None

    def hit(count):
        for key in rng.sample(list(recency), count):
            cache.get_or_load(key, pytest.fail)
            recency[key] = recency.pop(key)

    step = 0
    look(step)
    for i in range(entries):
        insert(i // 64)
    for _ in range(60):
        hit(20)
        step = step + 1 if rng.random() < 0.7 else rng.randrange(step + 1)
        look(step)
        hit(20)
        order = sorted(recency, key=lambda key: -abs(key[3][0] - step))  # stable: ties least recent first
        for j in range(rng.randrange(10, 300)):
            insert(step)  # 0 hops, the most recent: evicted after every block already there
            assert order[j] not in cache and order[j + 1] in cache
            del recency[order[j]]
    assert cache.rank_stats["ranked"] < cache.rank_stats["reranks"] * entries * 2 / 3  # mostly partial


def test_moved_from_another_thread_while_inserting():
    cache, views = tier(500, bytes(100))
    stop = threading.Event()

    def mover():
        step = 0
        while not stop.is_set():
            look_at(cache, views, GROUP, [((step % 50, 0, 0, 0), (step % 50, 3, 3, 3))])
            step += 1

    thread = threading.Thread(target=mover)
    thread.start()
    try:
        rng = np.random.default_rng(2)
        for index in rng.integers(0, 50, (5000, 4)):
            cache.get_or_load(block_key(index), lambda: bytes(100))
    finally:
        stop.set()
        thread.join(5)
    assert len(cache) == 500 and cache.size <= cache.capacity
    look_at(cache, views, GROUP, [((0, 0, 0, 0), (0, 0, 0, 0))])  # told last: the order is exact again
    farthest = max(views[GROUP].hops_of(key[3]) for key in cache.keys())
    before = set(cache.keys())
    cache.get_or_load(block_key((0, 0, 0, 60)), lambda: bytes(100))
    (evicted,) = before - set(cache.keys())
    assert views[GROUP].hops_of(evicted[3]) == farthest


def test_policy_changes_rebuild_the_index_and_its_charges():
    value = bytes(100)
    cache = TierCache(10 * (nbytes_of(value) + ENTRY_OVERHEAD + INDEX_OVERHEAD), "l2", policy="lru")
    views = {GROUP: Views([((0, 0, 0, 0), (0, 0, 0, 0))])}
    cache.set_distance(lambda key: (key[:3], key[3]), views.get)
    for t in range(10):
        cache.get_or_load(block_key((t, 0, 0, 0)), lambda: value)
    unindexed = cache.size
    cache.reconfigure(policy="distance")
    assert cache.size == unindexed + 10 * INDEX_OVERHEAD and len(cache) == 10
    cache.get_or_load(block_key((0, 0, 0, 1)), lambda: value)  # evicts the farthest: t=9
    assert block_key((9, 0, 0, 0)) not in cache
    cache.reconfigure(policy="lru")
    assert cache.size == unindexed
    cache.clear()
    assert cache.size == 0 and cache.rank_stats["reranks"] == 1


def traced_bytes_of(make):
    """Bytes a tier holds, by tracemalloc: the traced memory freed when it goes, counting only what this
    file and tierscope's cache allocated (threads of a cluster or server other tests left running in this
    process allocate and free meanwhile)."""
    from tierscope import cache as cache_module

    ours = [tracemalloc.Filter(True, path, all_frames=True) for path in (cache_module.__file__, __file__)]

    def traced() -> int:
        return sum(stat.size for stat in tracemalloc.take_snapshot().filter_traces(ours).statistics("filename"))

    gc.collect()
    tracemalloc.start(8)  # frames enough to reach this file from inside NumPy's or the cache's calls
    try:
        cache = make()
        gc.collect()
        held = traced()
        size, count = cache.size, len(cache)
        del cache
        gc.collect()
        return size, count, held - traced()
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("policy", ["lru", "distance"])
@pytest.mark.parametrize("inserts", [1, 3])
def test_charges_are_within_10_percent_of_traced_memory(policy, inserts):
    """Tiny frames (100-200 bytes) under worker block keys: filled once, or churned (three times the
    tier's worth of inserts, the view moving each 64). The issue's tiny frame was charged half its memory."""
    rng = random.Random(3)

    def make():
        cache, views = tier(2000, bytes(150), policy)
        for i in range(2000 * inserts):
            if i % 64 == 0:
                look_at(cache, views, GROUP, [((1000 + i // 64, 0, 0, 0), (1000 + i // 64, 0, 7, 7))])
            index = (1000 + i // 64, 0, (i // 8) % 8, i % 8)  # time steps past 256: ints of their own
            cache.get_or_load(block_key(index), lambda: bytes(rng.randrange(100, 201)))
        return cache

    size, count, held = traced_bytes_of(make)
    assert count > 1500
    assert abs(size - held) <= 0.1 * held, (size, held, (held - size) / count)


def test_block_charges_are_within_10_percent_of_traced_memory():
    def make():
        cache, views = tier(40, np.ones((1, 64, 64, 64), np.float32))
        look_at(cache, views, GROUP, [((0, 0, 0, 0), (0, 0, 0, 0))])
        for t in range(60):
            cache.get_or_load(block_key((t, 0, 0, 0)), lambda: np.ones((1, 64, 64, 64), np.float32))
        return cache

    size, count, held = traced_bytes_of(make)
    assert count == 40 and abs(size - held) <= 0.1 * held, (size, held)


def test_worker_tiers_evict_far_from_the_view_and_rerank_only_when_it_moves():
    source = Source.parse(URL)  # never fetched from: the test fills L1 itself
    spec = BlockSpec(source, VARIABLE, TOL, BlockGrid((100, 64, 64, 64), (1, 16, 16, 16)), "<f4")
    block = np.zeros(4, np.float32)
    tiers = WorkerTiers(3 * entry_charge(block.nbytes, "distance"), 0, policy="distance")
    tiers.set_view("s", spec, ((5, 0, 0, 0),))
    for t in (5, 9, 6, 4):  # 9 is the farthest from t=5
        tiers.l1.get_or_load(spec.block_key((t, 0, 0, 0)), lambda: block)
    assert sorted(k[3][0] for k in tiers.l1.keys()) == [4, 5, 6]
    reranks = tiers.l1.rank_stats["reranks"]
    tiers.set_view("s", spec, ((5, 0, 0, 0),))  # the same view again: nothing to re-rank
    tiers.l1.get_or_load(spec.block_key((5, 1, 0, 0)), lambda: block)  # 1 hop; 4 and 6 too: 6 is older
    assert tiers.l1.rank_stats["reranks"] == reranks
    tiers.set_view("s", spec, ((6, 0, 0, 0),))
    tiers.l1.get_or_load(spec.block_key((6, 1, 0, 0)), lambda: block)  # 4 and (5, 1) at 2 hops: 4 is older
    assert tiers.l1.rank_stats["reranks"] == reranks + 1
    assert sorted(k[3] for k in tiers.l1.keys()) == [(5, 0, 0, 0), (5, 1, 0, 0), (6, 1, 0, 0)]


def test_sessions_views_are_the_most_recent_distinct_boxes():
    grid = BlockGrid((100, 4, 4, 4), (1, 1, 1, 1))
    sessions = Sessions()
    for s in range(MAX_VIEWS + 10):
        pos, _ = sessions.position((f"s{s}", "d", "u", 0.0), grid)
        pos.observe([(s, 0, 0, 0)])
    twin, _ = sessions.position(("twin", "d", "u", 0.0), grid)  # the newest, on the newest one's view
    twin.observe([(MAX_VIEWS + 9, 0, 0, 0)])
    sessions.moved("d", "u")
    views = sessions.views(("d", "u"))
    assert len(views.boxes) == MAX_VIEWS - 1  # the twin's box once; the 11 least recent left out
    assert sessions.views(("d", "u")).hops_of((0, 0, 0, 0)) == 11
    assert sessions.views(("d", "v")) is None

import sys
import threading
import time

import numpy as np
import pytest

from tierscope.cache import ENTRY_OVERHEAD, INDEX_OVERHEAD, TierCache, Views, entry_charge, nbytes_of

ROOMY = 1 << 20  # holds every entry of a test that is not about eviction


def charge(value, indexed=False):
    """What one entry of ``value`` costs a tier: its memory, the tier's bookkeeping (and distance index)."""
    return nbytes_of(value) + ENTRY_OVERHEAD + (INDEX_OVERHEAD if indexed else 0)


C100 = charge(bytes(100))  # one entry of ``fill``


def test_charges_count_the_value_object_and_the_bookkeeping():
    assert nbytes_of(b"x" * 100) == sys.getsizeof(b"x" * 100) == 133
    block = np.zeros((1, 64, 64, 64), np.float32)
    assert nbytes_of(block) == block.nbytes + 160 == sys.getsizeof(block)
    cache = TierCache(ROOMY)
    cache.get_or_load("k", lambda: bytes(100))
    assert cache.size == C100 == 133 + ENTRY_OVERHEAD


def test_lru_evicts_least_recent_within_byte_bound():
    one = entry_charge(100)
    cache = TierCache(3 * one, "l1")
    for key in "abc":
        cache.get_or_load(key, lambda: np.zeros(100, dtype=np.uint8))
    cache.get_or_load("a", lambda: pytest.fail("a is cached"))  # a is now most recent
    cache.get_or_load("d", lambda: np.zeros(100, dtype=np.uint8))
    assert "b" not in cache and all(k in cache for k in "acd")
    assert cache.size == 3 * one and cache.stats.evictions == 1
    assert (cache.stats.hits, cache.stats.misses) == (1, 4)


def test_capacity_zero_is_off_and_oversize_is_not_kept():
    off = TierCache(0, "l2")
    assert off.get_or_load("k", lambda: b"xyz") == b"xyz"
    assert len(off) == 0 and off.stats.misses == 1
    small = TierCache(2, "l2")
    assert small.get_or_load("k", lambda: b"abc") == b"abc"
    assert "k" not in small and small.size == 0


def test_negative_capacity_rejected():
    with pytest.raises(ValueError, match="l1 capacity must be an int >= 0"):
        TierCache(-1, "l1")


def test_single_flight_runs_loader_once():
    cache = TierCache(1 << 20)
    calls = []
    gate = threading.Event()

    def loader():
        calls.append(1)
        gate.wait(5)
        return b"block"

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_load("k", loader)))
               for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join()
    assert calls == [1] and results == [b"block"] * 8
    assert cache.stats.misses == 1 and cache.stats.waits == 7


def test_failed_load_is_not_cached_and_reaches_every_waiter():
    cache = TierCache(100)
    with pytest.raises(OSError, match="boom"):
        cache.get_or_load("k", lambda: (_ for _ in ()).throw(OSError("boom")))
    assert "k" not in cache
    assert cache.get_or_load("k", lambda: b"ok") == b"ok"


@pytest.mark.parametrize("outcome", [b"block", OSError("boom")])
def test_a_thread_joining_a_flight_gets_its_value_or_its_exception(outcome):
    """The owner's load finishes only once a second thread has joined its flight (one wait counted)."""
    cache = TierCache(ROOMY)
    got = []

    def join():
        try:
            got.append(cache.get_or_load("k", pytest.fail))  # joins: never loads on its own
        except OSError as exc:
            got.append(exc)

    joiner = threading.Thread(target=join)

    def loader():
        joiner.start()
        deadline = time.monotonic() + 5
        while cache.stats.waits == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        if isinstance(outcome, OSError):
            raise outcome
        return outcome

    try:
        owned = cache.get_or_load("k", loader)
    except OSError as exc:
        owned = exc
    joiner.join(5)
    assert cache.stats.waits == 1 and got == [outcome] and owned is outcome
    assert ("k" in cache) == (outcome == b"block")


def fill(cache, keys, size=100, prefetch=False):
    for key in keys:
        cache.get_or_load(key, lambda: bytes(size), prefetch=prefetch)


def test_lfu_evicts_fewest_hits_first_ties_in_lru_order():
    cache = TierCache(3 * C100, "l3", policy="lfu")
    fill(cache, "abc")
    fill(cache, "aab")  # hits: a=2, b=1, c=0
    fill(cache, "d")  # evicts c (0 hits)
    assert cache.keys() == ["a", "b", "d"]
    fill(cache, "e")  # d has 0 hits, so d goes before the older but more used b
    assert set(cache.keys()) == {"a", "b", "e"}
    fill(cache, "ef")  # e: 1 hit; b and e tie at 1 hit, b is less recent
    assert set(cache.keys()) == {"a", "e", "f"} and cache.stats.evictions == 3


def test_fifo_evicts_in_insertion_order_and_hits_do_not_refresh():
    cache = TierCache(3 * C100, "l3", policy="fifo")
    fill(cache, "abc")
    fill(cache, "aaa")
    fill(cache, "d")
    assert cache.keys() == ["b", "c", "d"]
    fill(cache, "e")
    assert set(cache.keys()) == {"c", "d", "e"}


def test_distance_evicts_farthest_first_ties_lru_and_falls_back_to_lru():
    cache = TierCache(3 * charge(bytes(100), indexed=True), "l4", policy="distance")
    fill(cache, "abcd")  # no distance set: LRU (unindexed entries cost less: a fourth would fit)
    assert cache.keys() == ["b", "c", "d"]
    at = {"b": 1, "c": 5, "d": 5, "e": 0, "f": 2}  # each key's block on a line; the view is block 0
    cache.set_distance(lambda key: ("line", (at[key],)), lambda group: Views([((0,), (0,))], None))
    assert cache.keys() == ["b", "c", "d"] and cache.size == 3 * charge(bytes(100), indexed=True)
    fill(cache, "e")  # c and d tie at 5, c is less recent
    assert set(cache.keys()) == {"b", "d", "e"}
    fill(cache, "f")
    assert set(cache.keys()) == {"b", "e", "f"}


def test_distance_follows_the_view_when_the_owner_says_it_moved():
    cache = TierCache(3 * charge(bytes(100), indexed=True), "l4", policy="distance")
    view = {"line": Views([((0,), (0,))], None)}
    cache.set_distance(lambda key: ("line", (key,)), view.get)
    fill(cache, [0, 5, 9, 4])  # 9 is the farthest from 0
    assert sorted(cache.keys()) == [0, 4, 5]
    view["line"] = Views([((9,), (9,))], None)
    fill(cache, [8])  # not told: the cached blocks keep their hops from 0, so 5 goes, not 0
    assert sorted(cache.keys()) == [0, 4, 8]
    cache.moved("line")
    fill(cache, [7])  # told: 0 is now the farthest
    assert sorted(cache.keys()) == [4, 7, 8]
    view.clear()  # nobody views the line: every block is as far as any, so LRU among them
    cache.moved()
    fill(cache, [1])
    assert sorted(cache.keys()) == [1, 7, 8]
    view["line"] = Views([((8,), (8,))], None)  # viewed again: 1 is the farthest, not the least recent 7
    cache.moved("line")
    fill(cache, [2])
    assert sorted(cache.keys()) == [2, 7, 8]


def test_unknown_policy_is_rejected_by_name():
    with pytest.raises(ValueError, match="policy must be one of lru, lfu, fifo, distance, got 'mru'"):
        TierCache(10, policy="mru")
    with pytest.raises(ValueError, match="policy must be one of"):
        TierCache(10).reconfigure(policy="x")


def test_prefetch_counters_used_once_wasted_on_evict_and_clear():
    cache = TierCache(3 * C100, "l3")
    fill(cache, "abc", prefetch=True)
    assert cache.stats.as_dict() == dict(hits=0, misses=0, evictions=0, waits=0, prefetched=3,
                                         prefetch_used=0, prefetch_wasted=0)
    fill(cache, "aa")  # used once, two hits
    fill(cache, "a", prefetch=True)  # a prefetch hit counts nowhere
    assert (cache.stats.hits, cache.stats.prefetch_used) == (2, 1)
    fill(cache, "d")  # evicts b (LRU), never used
    assert cache.stats.prefetch_wasted == 1 and cache.stats.misses == 1
    cache.clear()  # c was never used: wasted; a was used; d was not prefetched
    assert cache.stats.prefetch_wasted == 2 and len(cache) == 0 and cache.size == 0


def test_user_joining_an_inflight_prefetch_counts_a_wait_and_marks_it_used():
    cache = TierCache(ROOMY)
    gate, started = threading.Event(), threading.Event()

    def slow():
        started.set()
        gate.wait(5)
        return b"x" * 10

    t = threading.Thread(target=cache.get_or_load, args=("k", slow), kwargs={"prefetch": True})
    t.start()
    started.wait(5)
    joined = []
    u = threading.Thread(target=lambda: joined.append(cache.get_or_load("k", pytest.fail)))
    p = threading.Thread(target=cache.get_or_load, args=("k", pytest.fail), kwargs={"prefetch": True})
    u.start(), p.start()
    time.sleep(0.05)
    gate.set()
    for th in (t, u, p):
        th.join(5)
    assert joined == [b"x" * 10]
    s = cache.stats
    assert (s.hits, s.misses, s.waits, s.prefetched, s.prefetch_used) == (1, 0, 1, 1, 1)
    cache.clear()
    assert cache.stats.prefetch_wasted == 0


def test_reconfigure_shrinks_in_policy_order_and_switches_off():
    cache = TierCache(4 * C100, "l4")
    fill(cache, "abcd")
    fill(cache, "a")
    cache.reconfigure(capacity=2 * C100)
    assert cache.keys() == ["d", "a"] and cache.size == 2 * C100 and cache.stats.evictions == 2
    cache.reconfigure(policy="fifo")
    fill(cache, "e")  # fifo: a was inserted before d, its recent hit does not matter
    assert cache.keys() == ["d", "e"]
    cache.reconfigure(capacity=0)
    assert len(cache) == 0 and cache.info()["capacity"] == 0 and cache.info()["policy"] == "fifo"
    with pytest.raises(ValueError, match="capacity must be an int >= 0"):
        cache.reconfigure(capacity=-5)


def test_peek_changes_nothing():
    cache = TierCache(2 * C100)
    fill(cache, "ab")
    assert cache.peek("a") == bytes(100) and cache.peek("zz") is None
    fill(cache, "c")  # a is still least recent despite the peek
    assert cache.keys() == ["b", "c"] and cache.stats.hits == 0


def test_many_threads_one_load_per_key_and_bytes_within_capacity():
    one = charge(bytes(64))
    cache = TierCache(50 * one, "l3", policy="lfu")
    loads = {}
    lock = threading.Lock()

    def loader(key):
        with lock:
            loads[key] = loads.get(key, 0) + 1
        time.sleep(0.001)
        return bytes(64)

    def worker(seed):
        rng = np.random.default_rng(seed)
        for key in rng.integers(0, 40, 300):
            cache.get_or_load(int(key), lambda k=int(key): loader(k), prefetch=bool(seed % 2))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(loads.values()) == {1}  # 40 keys fit: every key loaded exactly once
    assert cache.size == 40 * one <= cache.capacity
    s = cache.stats
    assert s.hits + s.misses == 8 * 300  # user lookups only
    assert s.prefetched + s.misses == 40


async def _async_loads(cache, n):
    import asyncio

    calls = []

    async def loader():
        calls.append(1)
        await asyncio.sleep(0.01)
        return b"v" * 8

    got = await asyncio.gather(*(cache.aget_or_load("k", loader, prefetch=i % 2 == 0) for i in range(n)))
    return calls, got


def test_async_single_flight_on_one_loop():
    import asyncio

    cache = TierCache(ROOMY)
    calls, got = asyncio.run(_async_loads(cache, 6))
    assert calls == [1] and got == [b"v" * 8] * 6
    s = cache.stats  # the first (prefetch) caller owns the load; 3 users joined it
    assert (s.waits, s.hits, s.misses, s.prefetched, s.prefetch_used) == (3, 3, 0, 1, 1)


def test_a_cancelled_waiter_does_not_break_the_load_others_share():
    import asyncio

    async def scenario():
        cache = TierCache(ROOMY)
        release = asyncio.Event()

        async def loader():
            await release.wait()
            return b"v" * 8

        owner = asyncio.create_task(cache.aget_or_load("k", loader))
        await asyncio.sleep(0)
        quitter = asyncio.create_task(cache.aget_or_load("k", loader))
        stayer = asyncio.create_task(cache.aget_or_load("k", loader))
        await asyncio.sleep(0)
        quitter.cancel()
        await asyncio.sleep(0)
        release.set()
        return await owner, await stayer, quitter.cancelled(), cache.peek("k")

    assert asyncio.run(scenario()) == (b"v" * 8, b"v" * 8, True, b"v" * 8)


def test_load_many_loads_only_what_is_neither_cached_nor_in_flight():
    cache = TierCache(ROOMY)
    cache.get_or_load("a", lambda: b"A")
    gate, started = threading.Event(), threading.Event()

    def slow():
        started.set()
        gate.wait(5)
        return b"B"

    t = threading.Thread(target=cache.get_or_load, args=("b", slow))
    t.start()
    started.wait(5)
    asked = []

    def batch(keys):
        asked.append(keys)
        return [k.upper().encode() for k in keys]

    loaded = cache.load_many(["a", "b", "c", "d", "c"], batch)
    gate.set()
    t.join(5)
    assert asked == [["c", "d"]] and loaded == {"c": b"C", "d": b"D"}
    assert sorted(cache.keys()) == ["a", "b", "c", "d"]
    s = cache.stats
    assert (s.hits, s.misses, s.prefetched) == (0, 2, 2)  # prefetch lookups count neither hit nor miss


def test_a_user_joining_a_batch_waits_for_it_and_shares_its_failure():
    cache = TierCache(1000)
    gate, started = threading.Event(), threading.Event()

    def batch(keys):
        started.set()
        gate.wait(5)
        raise OSError("server went away")

    errors = []

    def user():
        try:
            cache.get_or_load("y", pytest.fail)  # joins the batch's flight: never loads on its own
        except OSError as exc:
            errors.append(str(exc))

    p = threading.Thread(target=lambda: pytest.raises(OSError, cache.load_many, ["x", "y"], batch))
    p.start()
    started.wait(5)
    u = threading.Thread(target=user)
    u.start()
    time.sleep(0.05)
    gate.set()
    p.join(5), u.join(5)
    assert errors == ["server went away"] and len(cache) == 0
    assert cache.load_many(["x"], lambda keys: [b"X"]) == {"x": b"X"}  # the failed flights are gone


def test_load_many_returns_values_too_big_to_keep_and_checks_the_loader():
    cache = TierCache(2)
    assert cache.load_many(["k"], lambda keys: [b"abc"]) == {"k": b"abc"} and len(cache) == 0
    with pytest.raises(ValueError, match="returned 1 values for 2 keys"):
        cache.load_many(["p", "q"], lambda keys: [b"p"])
    assert cache.load_many(["p", "q"], lambda keys: [b"p", b"q"]) == {"p": b"p", "q": b"q"}


def test_get_all_counts_hits_only_when_every_key_is_held():
    cache = TierCache(ROOMY)
    cache.get_or_load("a", lambda: b"A", prefetch=True)
    cache.get_or_load("b", lambda: b"B")
    assert cache.get_all(["a", "c"]) is None
    s = cache.stats
    assert (s.hits, s.misses, s.prefetch_used) == (0, 1, 0)  # the partial answer counted nothing
    assert cache.get_all(["a", "b"]) == [b"A", b"B"]
    assert (s.hits, s.misses, s.prefetch_used) == (2, 1, 1)
    assert cache.get_all([]) == []

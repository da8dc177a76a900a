import threading
import time

import numpy as np
import pytest

from tierscope.cache import TierCache


def test_lru_evicts_least_recent_within_byte_bound():
    cache = TierCache(300, "l1")
    for key in "abc":
        cache.get_or_load(key, lambda: np.zeros(100, dtype=np.uint8))
    cache.get_or_load("a", lambda: pytest.fail("a is cached"))  # a is now most recent
    cache.get_or_load("d", lambda: np.zeros(100, dtype=np.uint8))
    assert "b" not in cache and all(k in cache for k in "acd")
    assert cache.size == 300 and cache.stats.evictions == 1
    assert (cache.stats.hits, cache.stats.misses) == (1, 4)


def test_capacity_zero_is_off_and_oversize_is_not_kept():
    off = TierCache(0, "l2")
    assert off.get_or_load("k", lambda: b"xyz") == b"xyz"
    assert len(off) == 0 and off.stats.misses == 1
    small = TierCache(2, "l2")
    assert small.get_or_load("k", lambda: b"abc") == b"abc"
    assert "k" not in small and small.size == 0


def test_negative_capacity_rejected():
    with pytest.raises(ValueError, match="l1 capacity must be >= 0"):
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

"""A byte-bounded cache tier with single-flight loads.

One ``TierCache`` is one tier (L1, L2, ...). Callers never check-then-fetch themselves: they call
``get_or_load(key, loader)``, which returns a cached value, waits for the load another thread already
started for the same key, or runs ``loader`` once and caches its result. So concurrent views of one block
cause one fetch, not several. A capacity of 0 switches the tier off (every call loads, nothing is kept);
a value larger than the whole capacity is returned but not kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

__all__ = ["TierCache", "TierStats", "nbytes_of"]

V = TypeVar("V")


def nbytes_of(value: Any) -> int:
    """Size a cached value is charged: ``nbytes`` for arrays, ``len`` for bytes-like values."""
    nbytes = getattr(value, "nbytes", None)
    return int(nbytes) if nbytes is not None else len(value)


@dataclass
class TierStats:
    """Counters of one tier; ``hits + misses`` is the number of lookups."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    waits: int = 0  # lookups that joined a load already in flight (counted as hits, not fetches)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class TierCache(Generic[V]):
    """LRU cache bounded by the bytes of its values, safe to share between threads."""

    def __init__(
        self, capacity: int, name: str = "tier", nbytes: Callable[[Any], int] = nbytes_of
    ) -> None:
        if capacity < 0:
            raise ValueError(f"{name} capacity must be >= 0 bytes, got {capacity}")
        self.name = name
        self.capacity = int(capacity)
        self._nbytes = nbytes
        self._lock = threading.Lock()
        self._data: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._inflight: dict[Hashable, Future[V]] = {}
        self._size = 0
        self.stats = TierStats()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    @property
    def size(self) -> int:
        """Bytes currently held."""
        return self._size

    def get_or_load(self, key: Hashable, loader: Callable[[], V]) -> V:
        """Return the value for ``key``, running ``loader`` at most once across threads."""
        with self._lock:
            entry = self._data.get(key)
            if entry is not None:
                self._data.move_to_end(key)
                self.stats.hits += 1
                return entry[0]
            pending = self._inflight.get(key)
            if pending is None:
                self.stats.misses += 1
                pending = self._inflight[key] = Future()
                owner = True
            else:
                self.stats.waits += 1
                self.stats.hits += 1
                owner = False
        if not owner:
            return pending.result()
        try:
            value = loader()
        except BaseException as exc:
            with self._lock:
                del self._inflight[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._inflight[key]
            self._insert(key, value)
        pending.set_result(value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._size = 0

    def info(self) -> dict[str, int]:
        """Stats plus occupancy, for ``tierscope.stats``."""
        with self._lock:
            return {
                **self.stats.as_dict(),
                "blocks": len(self._data),
                "nbytes": self._size,
                "capacity": self.capacity,
            }

    def _insert(self, key: Hashable, value: V) -> None:
        size = self._nbytes(value)
        old = self._data.pop(key, None)
        if old is not None:
            self._size -= old[1]
        if size > self.capacity:
            return
        while self._data and self._size + size > self.capacity:
            _, (_, evicted) = self._data.popitem(last=False)
            self._size -= evicted
            self.stats.evictions += 1
        self._data[key] = (value, size)
        self._size += size

"""A byte-bounded cache tier with single-flight loads and a choice of replacement policy.

One ``TierCache`` is one tier (L1, L2 on workers; L3, L4 on the server). Callers never check-then-fetch
themselves: they call ``get_or_load(key, loader)`` (threads) or ``aget_or_load(key, coroutine_fn)`` (an
asyncio loop), which returns a cached value, waits for the load already in flight for the same key, or
runs ``loader`` once and caches its result. So concurrent views of one block cause one fetch, not several.
A capacity of 0 switches the tier off (every call loads, nothing is kept; loads stay single-flight); a
value larger than the whole capacity is returned but not kept.

Eviction order when a new value needs room (``policy``):

- ``lru``: least recently used first; a user hit makes an entry most recent.
- ``lfu``: fewest user hits first; ties in LRU order.
- ``fifo``: insertion order; hits do not refresh an entry.
- ``distance``: the largest ``cache.distance(key)`` first (the owner sets that function, e.g. hops from
  the current view); ties in LRU order; with no distance function set it behaves as ``lru``.

Prefetch accounting: a ``prefetch=True`` load that inserts counts as *prefetched*; the first user lookup
of such an entry (or a user lookup joining its in-flight load) counts it as *used*, once; a prefetched
entry evicted or cleared before any user lookup counts as *wasted*. Prefetch lookups never count as
hits, misses or waits (so ``hits + misses`` is the number of user lookups) and do not change LFU counts;
a prefetch lookup that hits does refresh LRU recency, so a plan that re-touches blocks near the view
keeps them ahead of the farther blocks it is loading.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

__all__ = ["POLICIES", "TierCache", "TierStats", "check_policy", "nbytes_of"]

V = TypeVar("V")

POLICIES = ("lru", "lfu", "fifo", "distance")


def check_policy(policy: str) -> str:
    """Validate a replacement policy name."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


def nbytes_of(value: Any) -> int:
    """Size a cached value is charged: ``nbytes`` for arrays, ``len`` for bytes-like values."""
    nbytes = getattr(value, "nbytes", None)
    return int(nbytes) if nbytes is not None else len(value)


@dataclass
class TierStats:
    """Counters of one tier; ``hits + misses`` is the number of user lookups."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    waits: int = 0  # user lookups that joined a load already in flight (counted as hits, not fetches)
    prefetched: int = 0  # entries inserted by a prefetch load
    prefetch_used: int = 0  # prefetched entries a user lookup then asked for (each counted once)
    prefetch_wasted: int = 0  # prefetched entries evicted or cleared before any user lookup

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Entry:
    __slots__ = ("hits", "nbytes", "unused_prefetch", "value")

    def __init__(self, value: Any, nbytes: int, prefetched: bool) -> None:
        self.value, self.nbytes, self.hits, self.unused_prefetch = value, nbytes, 0, prefetched


class _Flight:
    """A load in progress: its result, whether a prefetch started it, whether a user joined it."""

    __slots__ = ("future", "prefetch", "used")

    def __init__(self, prefetch: bool) -> None:
        self.future: Future[Any] = Future()
        self.prefetch, self.used = prefetch, False


class TierCache(Generic[V]):
    """A tier bounded by the bytes of its values, safe to share between threads."""

    def __init__(
        self,
        capacity: int,
        name: str = "tier",
        nbytes: Callable[[Any], int] = nbytes_of,
        policy: str = "lru",
    ) -> None:
        self.name = name
        self.capacity = self._check_capacity(capacity)
        self.policy = check_policy(policy)
        self.distance: Callable[[Hashable], float] | None = None
        self._nbytes = nbytes
        self._lock = threading.Lock()
        self._data: OrderedDict[Hashable, _Entry] = OrderedDict()  # LRU order, most recent last
        self._inserted: dict[Hashable, None] = {}  # insertion order (FIFO), oldest first
        self._inflight: dict[Hashable, _Flight] = {}
        self._size = 0
        self.stats = TierStats()

    def _check_capacity(self, capacity: int) -> int:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"{self.name} capacity must be an int >= 0 bytes, got {capacity!r}")
        return capacity

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    @property
    def size(self) -> int:
        """Bytes currently held."""
        return self._size

    def keys(self) -> list[Hashable]:
        """Cached keys in LRU order (least recent first)."""
        with self._lock:
            return list(self._data)

    def peek(self, key: Hashable) -> V | None:
        """The cached value, or None; no stats, no recency change."""
        with self._lock:
            entry = self._data.get(key)
            return None if entry is None else entry.value

    def get_all(self, keys: Sequence[Hashable]) -> list[V] | None:
        """User lookups of ``keys`` that all hit, or None and nothing counted when any one is missing.

        For a reader that can only use the whole set (a direct view read): a partial answer must not
        count hits that the reader's fallback will count again.
        """
        with self._lock:
            entries = [self._data.get(key) for key in keys]
            if any(entry is None for entry in entries):
                return None
            for key, entry in zip(keys, entries, strict=True):
                self._touch(key, entry, prefetch=False)
            return [entry.value for entry in entries]

    def get_or_load(self, key: Hashable, loader: Callable[[], V], prefetch: bool = False) -> V:
        """Return the value for ``key``, running ``loader`` at most once across threads."""
        entry, flight, owner = self._lookup(key, prefetch)
        if entry is not None:
            return entry.value
        if not owner:
            return flight.future.result()
        try:
            value = loader()
        except BaseException as exc:
            self._fail(key, flight, exc)
            raise
        self._finish(key, flight, value)
        return value

    def load_many(
        self, keys: Sequence[Hashable], loader: Callable[[list[Hashable]], Sequence[V]]
    ) -> dict[Hashable, V]:
        """Prefetch: load, with one ``loader`` call, the ``keys`` neither cached nor in flight.

        Each loaded key is a flight of its own while ``loader`` runs, so a user lookup of it joins the
        batch instead of fetching again. Returns the values this call loaded (also those too big to keep).
        """
        owned: list[tuple[Hashable, _Flight]] = []
        for key in dict.fromkeys(keys):
            _, flight, owner = self._lookup(key, prefetch=True)
            if owner:
                owned.append((key, flight))
        if not owned:
            return {}
        try:
            values = list(loader([key for key, _ in owned]))
            if len(values) != len(owned):
                raise ValueError(f"{self.name}: the batch loader returned {len(values)} values "
                                 f"for {len(owned)} keys")
        except BaseException as exc:
            for key, flight in owned:
                self._fail(key, flight, exc)
            raise
        for (key, flight), value in zip(owned, values, strict=True):
            self._finish(key, flight, value)
        return {key: value for (key, _), value in zip(owned, values, strict=True)}

    async def aget_or_load(
        self, key: Hashable, loader: Callable[[], Awaitable[V]], prefetch: bool = False
    ) -> V:
        """``get_or_load`` for an asyncio loop: ``loader`` is awaited; waiters never block the loop."""
        entry, flight, owner = self._lookup(key, prefetch)
        if entry is not None:
            return entry.value
        if not owner:  # shielded: a waiter's cancellation must not cancel the load others share
            return await asyncio.shield(asyncio.wrap_future(flight.future))
        try:
            value = await loader()
        except BaseException as exc:
            self._fail(key, flight, exc)
            raise
        self._finish(key, flight, value)
        return value

    def _lookup(self, key: Hashable, prefetch: bool) -> tuple[_Entry | None, _Flight, bool]:
        """Under the lock: a cached entry, or the flight to join, or a new flight this caller owns."""
        with self._lock:
            entry = self._data.get(key)
            if entry is not None:
                self._touch(key, entry, prefetch)
                return entry, None, False  # type: ignore[return-value]
            flight = self._inflight.get(key)
            if flight is not None:
                if not prefetch:
                    self.stats.waits += 1
                    self.stats.hits += 1
                    flight.used = True
                return None, flight, False
            if not prefetch:
                self.stats.misses += 1
            flight = self._inflight[key] = _Flight(prefetch)
            return None, flight, True

    def _touch(self, key: Hashable, entry: _Entry, prefetch: bool) -> None:
        """A lookup found ``entry`` (lock held): recency, and for a user lookup a hit."""
        if self.policy != "fifo":
            self._data.move_to_end(key)
        if not prefetch:
            self.stats.hits += 1
            entry.hits += 1
            if entry.unused_prefetch:
                entry.unused_prefetch = False
                self.stats.prefetch_used += 1

    def _fail(self, key: Hashable, flight: _Flight, exc: BaseException) -> None:
        with self._lock:
            del self._inflight[key]
        if flight.future.done():
            return
        if isinstance(exc, CancelledError | asyncio.CancelledError):
            flight.future.cancel()
        else:
            flight.future.set_exception(exc)

    def _finish(self, key: Hashable, flight: _Flight, value: V) -> None:
        with self._lock:
            del self._inflight[key]
            self._insert(key, value, prefetched=flight.prefetch, used=flight.used)
        if not flight.future.done():
            flight.future.set_result(value)

    def reconfigure(self, capacity: int | None = None, policy: str | None = None) -> None:
        """Resize and/or change policy, evicting (in the new policy's order) until the values fit."""
        capacity = self.capacity if capacity is None else self._check_capacity(capacity)
        policy = self.policy if policy is None else check_policy(policy)
        with self._lock:
            self.capacity, self.policy = capacity, policy
            self._make_room(0)

    def clear(self) -> None:
        """Drop every entry (prefetched entries no user looked up count as wasted)."""
        with self._lock:
            self.stats.prefetch_wasted += sum(e.unused_prefetch for e in self._data.values())
            self._data.clear()
            self._inserted.clear()
            self._size = 0

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = TierStats()
            for entry in self._data.values():
                entry.unused_prefetch = False

    def info(self) -> dict[str, Any]:
        """Stats plus occupancy, for ``tierscope.stats`` and the server's ``/stats``."""
        with self._lock:
            return {
                **self.stats.as_dict(),
                "blocks": len(self._data),
                "nbytes": self._size,
                "capacity": self.capacity,
                "policy": self.policy,
            }

    def _insert(self, key: Hashable, value: V, prefetched: bool, used: bool) -> None:
        size = self._nbytes(value)  # no old entry to replace: loads run only for keys not cached
        if size > self.capacity:
            return
        self._make_room(size)
        self._data[key] = _Entry(value, size, prefetched and not used)
        self._inserted[key] = None
        self._size += size
        if prefetched:
            self.stats.prefetched += 1
            if used:
                self.stats.prefetch_used += 1

    def _make_room(self, size: int) -> None:
        """Evict until ``size`` more bytes fit (lock held)."""
        victims = None
        while self._data and self._size + size > self.capacity:
            if self.policy == "fifo":
                key = next(iter(self._inserted))
            elif self.policy == "lru" or (self.policy == "distance" and self.distance is None):
                key = next(iter(self._data))
            else:  # one ranking per insert, not one per evicted entry
                victims = victims or iter(self._ranked())
                key = next(victims)
            entry = self._data.pop(key)
            del self._inserted[key]
            self._size -= entry.nbytes
            self.stats.evictions += 1
            self.stats.prefetch_wasted += entry.unused_prefetch

    def _ranked(self) -> list[Hashable]:
        """Keys in lfu or distance eviction order (sorts are stable: ties stay in LRU order)."""
        lru = list(self._data)
        if self.policy == "lfu":
            return sorted(lru, key=lambda k: self._data[k].hits)
        distance = self.distance
        return sorted(lru, key=lambda k: -distance(k))

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
- ``distance``: the most hops from the current views first (the owner says where each key's block is
  and what is viewed with ``set_distance``, and calls ``moved`` when a view moves); ties in LRU order;
  with no distance set it behaves as ``lru``. The order is exact, kept by an index (``_DistanceIndex``):
  while the views stay, an insert ranks a bounded number of blocks, however many are cached or exist;
  after a view move, the next eviction ranks (vectorised) only the variable's cached blocks whose hops
  may have reached the farthest ones: a small move, few.

Charges: an entry costs its value's memory (``nbytes_of``: payload and object header) plus
``ENTRY_OVERHEAD`` bytes of bookkeeping (and ``INDEX_OVERHEAD`` under the distance index), so a tier of
tiny frames holds about the memory its capacity says, not twice that.

Prefetch accounting: a ``prefetch=True`` load that inserts counts as *prefetched*; the first user lookup
of such an entry (or a user lookup joining its in-flight load) counts it as *used*, once; a prefetched
entry evicted or cleared before any user lookup counts as *wasted*. Prefetch lookups never count as
hits, misses or waits (so ``hits + misses`` is the number of user lookups) and do not change LFU counts;
a prefetch lookup that hits does refresh LRU recency, so a plan that re-touches blocks near the view
keeps them ahead of the farther blocks it is loading.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from tierscope.prefetch import Box

__all__ = ["ENTRY_OVERHEAD", "INDEX_OVERHEAD", "POLICIES", "VALUE_HEADER", "TierCache", "TierStats", "Views",
           "check_policy", "entry_charge", "nbytes_of"]

V = TypeVar("V")

POLICIES = ("lru", "lfu", "fifo", "distance")

# Where a key's block is for the distance policy: (group, block index). A group is the blocks one set of
# views applies to (e.g. one variable's); ``ViewsOf(group)`` gives its current views, None if unviewed.
Locate = Callable[[Hashable], tuple[Hashable, Sequence[int]]]
ViewsOf = Callable[[Hashable], "Views | None"]

# Memory of a value with ``nbytes`` beyond its payload: a NumPy array's object with its shape and strides
# (sys.getsizeof of a 4-D view is 160; a block wrapper holding a frame or array costs about as much).
VALUE_HEADER = 160
# Bookkeeping bytes per entry beyond its value: a worker block key (a 4-tuple holding the block-index
# tuple and a time step past 256, an int of its own), the _Entry, its slots in the LRU and insertion-order
# dicts; and, under the distance policy, its row in the index and its share of the candidates and heap.
# From tracemalloc (tests/test_cache_distance.py, test_charges_are_within_10_percent_of_traced_memory):
# the memory a tier of 4000 frames of 100-200 bytes frees when dropped, less the frames' sys.getsizeof,
# per entry: 419 bytes filled once, 509 churned (dicts keep deleted slots until they resize); the index
# adds 86 and 91. The constants sit between the two, within 8% of a tiny frame's real memory either way.
ENTRY_OVERHEAD = 465
INDEX_OVERHEAD = 88


def check_policy(policy: str) -> str:
    """Validate a replacement policy name."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


def entry_charge(nbytes: int, policy: str = "lru") -> int:
    """What a tier with a distance set charges for one block (array or wrapper) of ``nbytes`` payload
    bytes: for sizing plans and tests to a tier's capacity."""
    return nbytes + VALUE_HEADER + ENTRY_OVERHEAD + (INDEX_OVERHEAD if policy == "distance" else 0)


def nbytes_of(value: Any) -> int:
    """Memory a cached value holds: payload plus object header, which is most of a tiny frame.

    ``nbytes`` (arrays, block wrappers) plus ``VALUE_HEADER``; ``sys.getsizeof`` for bytes-like values.
    """
    nbytes = getattr(value, "nbytes", None)
    return int(nbytes) + VALUE_HEADER if nbytes is not None else sys.getsizeof(value)


class Views:
    """Boxes of blocks being viewed (corners inclusive) on one grid: a block's distance is its hops to
    the nearest box (``prefetch.Box.distance``)."""

    __slots__ = ("boxes", "time_axis")

    def __init__(
        self, boxes: Sequence[tuple[Sequence[int], Sequence[int]]], time_axis: int | None = 0
    ) -> None:
        if not boxes:
            raise ValueError("Views needs at least one box")
        self.boxes = [Box(tuple(map(int, lo)), tuple(map(int, hi))) for lo, hi in boxes]
        self.time_axis = time_axis

    def hops(self, columns: np.ndarray) -> np.ndarray:
        """Hops of each column of an (ndim, n) array of block indices, to the nearest box."""
        out = None
        for box in self.boxes:
            hops = box.distances(columns.T, self.time_axis)
            out = hops if out is None else np.minimum(out, hops, out=out)
        return out

    def hops_of(self, index: Sequence[int]) -> int:
        """Hops of one block: plain Python, cheaper than NumPy for a few blocks."""
        return min(box.distance(index, self.time_axis) for box in self.boxes)

    def drift(self, other: Views) -> float:
        """The most any block's hops can differ between these views and ``other`` (inf: not comparable).

        A box's hops are 1-Lipschitz in its corners (per axis, the farther-moved corner; the time axis
        adds to the farthest other axis), and the nearest box changes by at most the Hausdorff distance
        between the two box sets under that corner shift.
        """
        mine = np.array([(box.lo, box.hi) for box in self.boxes])  # (boxes, 2, ndim)
        theirs = np.array([(box.lo, box.hi) for box in other.boxes])
        if other.time_axis != self.time_axis or mine.shape[2] != theirs.shape[2]:
            return math.inf
        moved = np.abs(mine[:, None] - theirs[None]).max(axis=2)  # (mine, theirs, ndim)
        if self.time_axis is None:
            shift = moved.max(axis=2)
        else:
            spatial = np.delete(moved, self.time_axis, axis=2).max(axis=2, initial=0)
            shift = moved[..., self.time_axis] + spatial
        return float(max(shift.min(axis=1).max(), shift.min(axis=0).max()))


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
    """A cached value; ``group`` and ``slot`` place it in the distance index (when there is one)."""

    __slots__ = ("group", "hits", "key", "nbytes", "slot", "unused_prefetch", "value")

    def __init__(self, key: Hashable, value: Any, nbytes: int, prefetched: bool) -> None:
        self.key, self.value, self.nbytes, self.hits, self.unused_prefetch = key, value, nbytes, 0, prefetched
        self.group: _Group | None = None
        self.slot = -1


_MISS = object()  # a lookup found no cached value


class _Flight:
    """A load in progress: its result, whether a prefetch started it, whether a user joined it.

    The future is made (under the lock) only when a second caller joins: most loads have no waiter, and a
    future costs a condition variable to make and to resolve. Once the flight has left ``_inflight`` its
    future is final, so the owner reads it after the lock.
    """

    __slots__ = ("future", "prefetch", "used")

    def __init__(self, prefetch: bool) -> None:
        self.future: Future[Any] | None = None
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
        self._nbytes = nbytes
        self._locate: Locate | None = None
        self._views: ViewsOf | None = None
        self._index: _DistanceIndex | None = None  # only under the distance policy with a distance set
        self.rank_stats = {"reranks": 0, "ranked": 0}  # distance index work: rankings, blocks ranked
        self._lock = threading.Lock()
        self._data: OrderedDict[Hashable, _Entry] = OrderedDict()  # LRU order, most recent last
        self._inserted: dict[Hashable, None] = {}  # insertion order (FIFO), oldest first
        self._inflight: dict[Hashable, _Flight] = {}
        self._size = 0
        self.stats = TierStats()

    def set_distance(self, locate: Locate, views: ViewsOf) -> None:
        """Give the distance policy its distances: where each key's block is, and what is viewed.

        ``locate(key) -> (group, block index)``; ``views(group) -> Views | None`` (None: nobody views
        the group, its blocks are infinitely far). The cache computes hops itself, for thousands of
        blocks at once. Call ``moved`` when a group's views change, or the order keeps the old ones.
        """
        with self._lock:
            self._locate, self._views = locate, views
            self._reindex()
            self._make_room(0)

    def moved(self, group: Hashable | None = None) -> None:
        """``group``'s view (every group's: None) moved. Cheap, and safe without the lock from any thread:
        the next eviction re-ranks that group's blocks."""
        index = self._index
        if index is not None:
            index.moved(group)

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

    def get_first(self, keys: Sequence[Hashable], prefetch: bool = False) -> V | None:
        """The value of the first of ``keys`` held (a lookup that hits: counted, recency kept), else None
        and nothing counted. For alternatives that all answer the request: a frame within a tighter tol
        answers a looser view."""
        with self._lock:
            for key in keys:
                entry = self._data.get(key)
                if entry is not None:
                    self._touch(key, entry, prefetch)
                    return entry.value
            return None

    def get_or_load(self, key: Hashable, loader: Callable[[], V], prefetch: bool = False) -> V:
        """Return the value for ``key``, running ``loader`` at most once across threads."""
        value, flight, owner = self._lookup(key, prefetch)
        if value is not _MISS:
            return value
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
        self, keys: Sequence[Hashable], loader: Callable[[list[Hashable]], Sequence[V]],
        prefetch: bool = True,
    ) -> dict[Hashable, V]:
        """Load, with one ``loader`` call, the ``keys`` neither cached nor in flight (prefetch, or with
        ``prefetch=False`` the user's misses of one view: counted as lookups).

        Each loaded key is a flight of its own while ``loader`` runs, so a user lookup of it joins the
        batch instead of fetching again. Returns the values this call loaded (also those too big to keep).
        """
        owned: list[tuple[Hashable, _Flight]] = []
        for key in dict.fromkeys(keys):
            _, flight, owner = self._lookup(key, prefetch=prefetch)
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

    def load_stream(
        self, keys: Sequence[Hashable], loader: Callable[[list[Hashable]], Iterable[tuple[Hashable, V]]],
        prefetch: bool = True,
    ) -> Iterator[tuple[Hashable, V]]:
        """``load_many`` for a loader that delivers (key, value) pairs one by one, in any order: each is
        kept and handed on as it arrives. Keys the loader leaves out, or that it had not delivered when it
        failed or the caller stopped, fail their flights (their waiters load again)."""
        owned: dict[Hashable, _Flight] = {}
        for key in dict.fromkeys(keys):
            _, flight, owner = self._lookup(key, prefetch=prefetch)
            if owner:
                owned[key] = flight
        try:
            if owned:
                for key, value in loader(list(owned)):
                    flight = owned.pop(key, None)
                    if flight is not None:
                        self._finish(key, flight, value)
                        yield key, value
            if owned:
                raise ValueError(f"{self.name}: the loader left {len(owned)} of its keys unloaded")
        except BaseException as exc:
            for key, flight in owned.items():
                self._fail(key, flight, exc)
            raise

    async def aget_or_load(
        self, key: Hashable, loader: Callable[[], Awaitable[V]], prefetch: bool = False
    ) -> V:
        """``get_or_load`` for an asyncio loop: ``loader`` is awaited; waiters never block the loop."""
        value, flight, owner = self._lookup(key, prefetch)
        if value is not _MISS:
            return value
        if not owner:  # shielded: a waiter's cancellation must not cancel the load others share
            return await asyncio.shield(asyncio.wrap_future(flight.future))
        try:
            value = await loader()
        except BaseException as exc:
            self._fail(key, flight, exc)
            raise
        self._finish(key, flight, value)
        return value

    def _lookup(self, key: Hashable, prefetch: bool) -> tuple[Any, _Flight, bool]:
        """Under the lock: a cached value (else ``_MISS``), or the flight to join, or a new flight this
        caller owns. The value is read under the lock: an eviction drops it from its entry."""
        with self._lock:
            entry = self._data.get(key)
            if entry is not None:
                self._touch(key, entry, prefetch)
                return entry.value, None, False  # type: ignore[return-value]
            flight = self._inflight.get(key)
            if flight is not None:
                if flight.future is None:
                    flight.future = Future()
                if not prefetch:
                    self.stats.waits += 1
                    self.stats.hits += 1
                    flight.used = True
                return _MISS, flight, False
            if not prefetch:
                self.stats.misses += 1
            flight = self._inflight[key] = _Flight(prefetch)
            return _MISS, flight, True

    def _touch(self, key: Hashable, entry: _Entry, prefetch: bool) -> None:
        """A lookup found ``entry`` (lock held): recency, and for a user lookup a hit."""
        if self.policy != "fifo":
            self._data.move_to_end(key)
            if self._index is not None:
                self._index.touch(entry)
        if not prefetch:
            self.stats.hits += 1
            entry.hits += 1
            if entry.unused_prefetch:
                entry.unused_prefetch = False
                self.stats.prefetch_used += 1

    def _fail(self, key: Hashable, flight: _Flight, exc: BaseException) -> None:
        with self._lock:
            del self._inflight[key]
        future = flight.future
        if future is None or future.done():
            return
        if isinstance(exc, CancelledError | asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(exc)

    def _finish(self, key: Hashable, flight: _Flight, value: V) -> None:
        try:
            with self._lock:
                del self._inflight[key]
                self._insert(key, value, prefetched=flight.prefetch, used=flight.used)
        finally:  # waiters get the loaded value even if keeping it failed (a bad key for the index)
            if flight.future is not None and not flight.future.done():
                flight.future.set_result(value)

    def reconfigure(self, capacity: int | None = None, policy: str | None = None) -> None:
        """Resize and/or change policy, evicting (in the new policy's order) until the values fit."""
        capacity = self.capacity if capacity is None else self._check_capacity(capacity)
        policy = self.policy if policy is None else check_policy(policy)
        with self._lock:
            self.capacity = capacity
            if policy != self.policy:
                self.policy = policy
                self._reindex()
            self._make_room(0)

    def clear(self) -> None:
        """Drop every entry (prefetched entries no user looked up count as wasted)."""
        with self._lock:
            self.stats.prefetch_wasted += sum(e.unused_prefetch for e in self._data.values())
            self._data.clear()
            self._inserted.clear()
            self._size = 0
            self._reindex()

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
        # no old entry to replace: loads only run for keys not cached
        size = self._nbytes(value) + ENTRY_OVERHEAD + (INDEX_OVERHEAD if self._index is not None else 0)
        if size > self.capacity:
            return
        self._make_room(size)
        entry = _Entry(key, value, size, prefetched and not used)
        if self._index is not None:
            self._index.add(entry)
        self._data[key] = entry
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
            elif self._index is not None:
                key = self._index.victim().key
            elif self.policy == "lfu":  # one ranking per insert, not one per evicted entry
                victims = victims or iter(self._ranked_lfu())
                key = next(victims)
            else:  # lru, or distance with no distance set
                key = next(iter(self._data))
            self._evict(key)

    def _evict(self, key: Hashable) -> None:
        entry = self._data.pop(key)
        del self._inserted[key]
        if self._index is not None:
            self._index.remove(entry)
        entry.key = entry.value = None  # the index may still hold the entry until it skips it
        self._size -= entry.nbytes
        self.stats.evictions += 1
        self.stats.prefetch_wasted += entry.unused_prefetch

    def _ranked_lfu(self) -> list[Hashable]:
        """Keys in lfu eviction order (the sort is stable: ties stay in LRU order)."""
        return sorted(self._data, key=lambda k: self._data[k].hits)

    def _reindex(self) -> None:
        """(Lock held) A new distance index over the cached entries, in LRU order, if the policy uses one;
        while there is one, its bookkeeping is part of each entry's charge."""
        old, self._index = self._index, None
        if self.policy == "distance" and self._locate is not None:
            self._index = _DistanceIndex(self._locate, self._views, self.rank_stats)
        change = INDEX_OVERHEAD * ((self._index is not None) - (old is not None))
        for entry in self._data.values():
            entry.group = None  # no longer in the old index: let its arrays go
            entry.nbytes += change
            if self._index is not None:
                self._index.add(entry)
        self._size += change * len(self._data)


MIN_SLOTS = 16
MIN_CANDIDATES = 64


class _Slots:
    """One group's blocks as rows 0..count-1 of NumPy arrays (block index columns, recency tick, bounds on
    the hops) beside their entries: a ranking reads them whole, with no call per block and no gather.

    Kept dense: a removal moves the last row into the hole (and tells its entry its new slot).
    """

    def __init__(self, ndim: int) -> None:
        self.count = 0
        self.index = np.empty((ndim, MIN_SLOTS), np.int32)
        self.tick = np.empty(MIN_SLOTS, np.int64)
        # hops under the group's current views lie in [lo - drift, hi + drift] (``_Group``); -inf, inf
        # until ranked. A row ranked at drift d has lo = hops + d, hi = hops - d.
        self.lo = np.empty(MIN_SLOTS)
        self.hi = np.empty(MIN_SLOTS)
        self.entries: list[_Entry | None] = [None] * MIN_SLOTS  # a list: the GC sees its cycles

    def add(self, entry: _Entry, index: Sequence[int], tick: int) -> None:
        if self.count == len(self.tick):
            self._resize(self.count + self.count // 2)
        if len(index) != len(self.index):
            raise ValueError(f"block index {tuple(index)} has not the {len(self.index)} axes of its group")
        slot = self.count
        self.index[:, slot] = index  # before any change: an index out of int32 range raises here
        self.tick[slot], self.lo[slot], self.hi[slot], self.entries[slot] = tick, -math.inf, math.inf, entry
        entry.slot, self.count = slot, slot + 1

    def remove(self, entry: _Entry) -> None:
        slot, last = entry.slot, self.count - 1
        if slot != last:
            moved = self.entries[last]
            self.index[:, slot] = self.index[:, last]
            self.tick[slot], self.lo[slot], self.hi[slot] = self.tick[last], self.lo[last], self.hi[last]
            self.entries[slot], moved.slot = moved, slot
        self.entries[last] = None
        self.count = last
        if MIN_SLOTS < len(self.tick) and last < len(self.tick) // 4:
            self._resize(len(self.tick) // 2)

    def forget(self) -> None:
        """Every row is to be ranked again."""
        self.lo[:self.count], self.hi[:self.count] = -math.inf, math.inf

    def rank(self, rows: np.ndarray, hops: np.ndarray, drift: float) -> None:
        """Set ``rows``' hops, ranked at ``drift``."""
        self.lo[rows], self.hi[rows] = hops + drift, hops - drift

    def _resize(self, capacity: int) -> None:
        n = self.count
        index, tick, lo, hi, entries = self.index, self.tick, self.lo, self.hi, self.entries
        self.index = np.empty((len(index), capacity), np.int32)
        self.tick, self.lo, self.hi = np.empty(capacity, np.int64), np.empty(capacity), np.empty(capacity)
        self.index[:, :n], self.tick[:n], self.lo[:n], self.hi[:n] = index[:, :n], tick[:n], lo[:n], hi[:n]
        self.entries = entries[:n] + [None] * (capacity - n)


# An eviction candidate, in eviction order when sorted: (-distance, tick, entry); ticks are unique.
_Candidate = tuple[float, int, _Entry]
# Below this many (block, box) pairs, hops of the blocks added since a ranking are computed in Python.
FEW_HOPS = 256


class _Group:
    """One group's slots and eviction candidates.

    A ranking keeps the K farthest entries sorted by (distance desc, tick asc); those touched since go on
    a heap, and entries added since too once their hops are known (computed together, at the next
    eviction). The next victim is the better of the two heads. An entry left out of the K orders after
    the K-th (a touch only makes it more recent), so the order is exact. The group ranks again when its
    views moved, when the K run out while such entries remain, or when the heap outgrows a quarter of
    the group (which bounds its memory). K is twice the candidates the previous ranking used: about as
    many as the evictions between two view moves.

    A ranking computes the hops of only the rows that may be among the K (``_near_top``): ``drift`` sums
    the moves of the views the group has seen (``Views.drift``), and a row ranked when the drift was d is
    within drift - d hops of the hops it was ranked with. A row whose upper bound falls short of the K
    largest lower bounds orders after all K. So a small move ranks the rows near the top, and a row far
    below them once the bound, widening with each move, reaches them.
    """

    def __init__(self, name: Hashable, ndim: int) -> None:
        self.name = name
        self.slots = _Slots(ndim)
        self.epoch: tuple[int, int] | None = None  # the view moves the ranking saw; None: rank next time
        self.views: Views | None = None  # the views last ranked under
        self.drift = 0.0  # the moves of the views seen, summed (``Views.drift``)
        self.cand_negd: list[float] = []  # the candidates, farthest first, as lists: read one at a time
        self.cand_tick: list[int] = []
        self.cand_entries: list[_Entry] = []
        self.next = 0  # candidates before this one were evicted or touched
        self.floor = -math.inf  # a lower bound (``_Slots.lo``) that 3K rows reached at the ranking
        self.rest = False  # whether entries outside the candidates remain from the ranking
        self.fresh: list[_Candidate] = []
        self.pending: list[tuple[_Entry, Sequence[int]]] = []  # added since the ranking, hops unknown

    def add(self, entry: _Entry, index: Sequence[int], tick: int) -> None:
        self.slots.add(entry, index, tick)
        entry.group = self
        if self.epoch is not None:
            self.pending.append((entry, index))
            self._bound_heap()

    def touch(self, entry: _Entry, tick: int) -> None:
        """A touched row ranked under the current views goes on the heap: it may be a candidate. Any other
        row is none (a ranking takes its candidates from the rows it ranks): it orders after them."""
        slots, slot = self.slots, entry.slot
        slots.tick[slot] = tick
        hops = float(slots.lo[slot]) - self.drift
        if self.epoch is not None and hops == slots.hi[slot] + self.drift:
            heapq.heappush(self.fresh, (-hops, tick, entry))
            self._bound_heap()

    def remove(self, entry: _Entry) -> None:
        self.slots.remove(entry)
        entry.group = None  # its candidates and heap items no longer match it

    def _current(self, tick: int, entry: _Entry) -> bool:
        """Whether a candidate or heap item still stands for its entry (neither evicted nor touched)."""
        return entry.group is self and self.slots.tick[entry.slot] == tick

    def _bound_heap(self) -> None:
        if len(self.fresh) + len(self.pending) > MIN_CANDIDATES + self.slots.count // 4:
            self.epoch, self.fresh, self.pending = None, [], []

    def head(self, epoch: tuple[int, int], views_of: ViewsOf, stats: dict[str, int]) -> _Candidate:
        """The group's next victim (the group is not empty); ``epoch``: its view moves so far."""
        if self.epoch != epoch or self.pending:
            self._see(views_of(self.name))  # after ``epoch`` was read: a move from now on ranks again
            if self.epoch != epoch:
                self._rank(epoch, stats)
            else:
                self._resolve(stats)
        while True:
            cand, fresh = self._candidate(), self._fresh()
            if cand is None and self.rest:
                self._rank(epoch, stats)
                continue
            if cand is None or fresh is None:
                return cand or fresh  # type: ignore[return-value]
            return min(cand, fresh)

    def _see(self, views: Views | None) -> None:
        """Rank under ``views`` from now on: add their move to the drift, or when it has no bound (to or
        from no views, another grid), forget every ranked distance."""
        if views is self.views:
            return
        if views is None or self.views is None or (step := self.views.drift(views)) == math.inf:
            self.slots.forget()
            self.epoch = None
        else:
            self.drift += step
        self.views = views

    def _candidate(self) -> _Candidate | None:
        while self.next < len(self.cand_entries):
            entry, tick = self.cand_entries[self.next], self.cand_tick[self.next]
            if self._current(tick, entry):
                return self.cand_negd[self.next], tick, entry
            self.next += 1
        return None

    def _fresh(self) -> _Candidate | None:
        while self.fresh and not self._current(self.fresh[0][1], self.fresh[0][2]):
            heapq.heappop(self.fresh)
        return self.fresh[0] if self.fresh else None

    def _rank(self, epoch: tuple[int, int], stats: dict[str, int]) -> None:
        n, slots = self.slots.count, self.slots
        k = min(max(MIN_CANDIDATES, min(2 * self.next, n // 4)), n)
        rows = self._near_top(k)
        if self.views is None:
            hops = np.full(len(rows), math.inf)
        else:  # take gives C order, which hops reads several times faster than fancy indexing's F order
            hops = self.views.hops(slots.index.take(rows, axis=1))
        slots.rank(rows, hops, self.drift)
        negd, ticks = -hops, slots.tick[rows]
        chosen = _first(negd, ticks, k)
        self.cand_negd, self.cand_tick = negd[chosen].tolist(), ticks[chosen].tolist()
        self.cand_entries = [slots.entries[slot] for slot in rows[chosen].tolist()]
        spare = len(rows) - 3 * k  # the next ranking wants at most 2k after at most k of these are gone
        self.floor = np.partition(hops, spare)[spare] + self.drift if spare >= 0 else -math.inf
        self.next, self.rest = 0, k < n
        self.fresh, self.pending, self.epoch = [], [], epoch
        stats["reranks"] += 1
        stats["ranked"] += len(rows)

    def _near_top(self, k: int) -> np.ndarray:
        """The rows that may be among the ``k`` farthest under the current views: k rows are at least
        cut - drift hops away, and only a row that may be as far could order before them.

        The cut, the k-th largest lower bound, is looked for first among the rows at or above the floor
        (all of them in ``near``): they hold the k largest when they are k or more."""
        n, reach = self.slots.count, 2 * self.drift
        lo, hi = self.slots.lo[:n], self.slots.hi[:n]
        near = np.flatnonzero(hi >= self.floor - reach)  # a row's lo is at most its hi + 2 drift
        high = lo[near]
        high = high[high >= self.floor]
        if len(high) < k:
            near, high = np.arange(n), lo
        cut = np.partition(high, len(high) - k)[len(high) - k]
        return near[hi[near] >= cut - reach]

    def _resolve(self, stats: dict[str, int]) -> None:
        """Hops of the pending entries, onto the heap."""
        pending, self.pending, views = self.pending, [], self.views
        if views is None:
            hops = [math.inf] * len(pending)
        elif len(pending) * len(views.boxes) <= FEW_HOPS:
            hops = [views.hops_of(index) for _, index in pending]
        else:
            slots = np.fromiter((entry.slot for entry, _ in pending), np.intp, len(pending))
            hops = views.hops(self.slots.index.take(slots, axis=1)).tolist()
        lo, hi, ticks, drift = self.slots.lo, self.slots.hi, self.slots.tick, self.drift
        for (entry, _), dist in zip(pending, hops, strict=True):
            slot = entry.slot
            lo[slot], hi[slot] = dist + drift, dist - drift
            heapq.heappush(self.fresh, (-dist, int(ticks[slot]), entry))
        stats["ranked"] += len(pending)


def _first(negd: np.ndarray, ticks: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k smallest (negd, tick) pairs, sorted; ties at the cut go by tick too."""
    if k < len(negd):
        cut = np.partition(negd, k - 1)[k - 1]
        inside, ties = np.flatnonzero(negd < cut), np.flatnonzero(negd == cut)
        need = k - len(inside)
        if need < len(ties):
            ties = ties[np.argpartition(ticks[ties], need - 1)[:need]]
        chosen = np.concatenate([inside, ties])
    else:
        chosen = np.arange(len(negd))
    return chosen[np.lexsort((ticks[chosen], negd[chosen]))]


class _DistanceIndex:
    """The distance policy's eviction order over every group, with no call per cached entry.

    The next victim is the best of the groups' heads (O(groups) per eviction, groups being the
    variables in view). ``moved`` only bumps a counter, so any thread may call it: a group whose
    counters changed since its ranking re-ranks before its next head is read (the counters are read
    before the views, so a move during a ranking is seen by the next one).
    """

    def __init__(self, locate: Locate, views_of: ViewsOf, stats: dict[str, int]) -> None:
        self._locate, self._views_of, self._stats = locate, views_of, stats
        self._groups: dict[Hashable, _Group] = {}
        self._ticks = itertools.count()
        self._moves = itertools.count(1)
        self._moved_all = 0
        self._moved: dict[Hashable, int] = {}

    def moved(self, group: Hashable | None) -> None:
        if group is None:
            self._moved_all = next(self._moves)
        else:
            self._moved[group] = next(self._moves)

    def add(self, entry: _Entry) -> None:
        name, index = self._locate(entry.key)
        group = self._groups.get(name) or _Group(name, len(index))
        group.add(entry, index, next(self._ticks))
        self._groups[name] = group

    def touch(self, entry: _Entry) -> None:
        entry.group.touch(entry, next(self._ticks))

    def remove(self, entry: _Entry) -> None:
        group = entry.group
        group.remove(entry)
        if not group.slots.count:
            del self._groups[group.name]

    def victim(self) -> _Entry:
        """The entry to evict next (the index is not empty)."""
        heads = (group.head((self._moved_all, self._moved.get(name, 0)), self._views_of, self._stats)
                 for name, group in self._groups.items())
        return min(heads)[2]

"""Where each client session is looking, and the queue of prefetch work planned from it.

A ``Position`` (tierscope.prefetch) is kept per (session, dataset, variable, tol); the table is bounded and
drops the least recently seen. The prefetch queue holds one plan per position; a new plan for a position
replaces its old one (the dropped remainder is *cancelled*), and workers take from the plans in turn so one
busy session cannot starve another. The positions belong to the planning thread (``planner.py``), the
queue to the service's event loop: each has one owner, no locks.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from typing import NamedTuple

from tierscope.cache import Views
from tierscope.grid import BlockGrid, BlockIndex
from tierscope.prefetch import Position

__all__ = ["PositionKey", "PrefetchItem", "PrefetchQueue", "Sessions", "check_session"]

PositionKey = tuple[str, str, str, float]  # (session, dataset, variable, tol)
# The distance policy measures from at most this many views per variable (the most recent): a ranking
# costs one pass over the cached blocks per view.
MAX_VIEWS = 64
# A plan is for the view after the current one: one older than this has been overtaken or abandoned.
PLAN_TTL_S = 2.0
# Blocks queued over all plans (a few full plans): beyond this the oldest plans are dropped.
MAX_QUEUED = 4096
_SESSION = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def check_session(session: str) -> str:
    if not _SESSION.fullmatch(session):
        raise ValueError(
            f"X-Tierscope-Session must be 1-128 characters of A-Z a-z 0-9 _ . : -, got {session[:40]!r}"
        )
    return session


class PrefetchItem(NamedTuple):
    """One planned block: fill L4 with its raw block, and L3 with its frame when ``to_l3``. A named tuple:
    a plan makes hundreds at once, several times faster than a frozen dataclass's."""

    dataset: str
    variable: str
    index: BlockIndex
    tol: float
    codec: str
    to_l3: bool


class Sessions:
    """A bounded table of positions, with a per-variable view for distance-ordered eviction.

    ``views`` gives the tiers' distance policy a variable's current view boxes, kept (rebuilt after a
    position moves) so the tiers rank thousands of cached blocks against every session at once.
    """

    def __init__(self, max_positions: int = 1024) -> None:
        self.max_positions = max_positions
        self._positions: OrderedDict[PositionKey, Position] = OrderedDict()
        self._by_variable: dict[tuple[str, str], dict[PositionKey, Position]] = {}
        self._boxes: dict[tuple[str, str], Views | None] = {}

    def moved(self, dataset: str, variable: str) -> None:
        """A position on this variable changed its view: rebuild its boxes on the next ``distance``."""
        self._boxes.pop((dataset, variable), None)

    def __len__(self) -> int:
        return len(self._positions)

    def position(
        self, key: PositionKey, grid: BlockGrid, time_axis: int | None = 0
    ) -> tuple[Position, PositionKey | None]:
        """The position for ``key`` (created if new) and the key it pushed out of the table, if any."""
        pos = self._positions.get(key)
        if pos is not None:
            self._positions.move_to_end(key)
            return pos, None
        dropped = None
        if len(self._positions) >= self.max_positions:
            dropped, _ = self._positions.popitem(last=False)
            self._by_variable[dropped[1:3]].pop(dropped)
            self.moved(*dropped[1:3])
        pos = self._positions[key] = Position(grid, time_axis)
        self._by_variable.setdefault(key[1:3], {})[key] = pos
        return pos, dropped

    def views(self, variable: tuple[str, str]) -> Views | None:
        """The current views on a (dataset, variable), at most ``MAX_VIEWS`` most recent; None: no view."""
        if variable not in self._boxes:
            self._boxes[variable] = self._stack(variable)
        return self._boxes[variable]

    def _stack(self, key: tuple[str, str]) -> Views | None:
        positions = self._by_variable.get(key, {})
        if len(positions) > MAX_VIEWS:  # the most recently seen ones, in the table's order
            recent = (k for k in reversed(self._positions) if k in positions)
            positions = {k: positions[k] for k in itertools.islice(recent, MAX_VIEWS)}
        views = [p for p in positions.values() if p.box is not None]
        if not views:
            return None
        boxes = dict.fromkeys((p.box.lo, p.box.hi) for p in views)  # sessions on one view: one box
        return Views(list(boxes), views[0].time_axis)

    def clear(self) -> None:
        self._positions.clear()
        self._by_variable.clear()
        self._boxes.clear()


class PrefetchQueue:
    """Plans per position, taken round-robin; replacing a plan drops what was left of the old one.

    Bounded: a plan older than ``ttl`` seconds is dropped unserved (its session has moved on or gone:
    prefetch is only worth it for the view after the current one), and past ``max_items`` queued
    blocks the oldest plans go first. Dropped blocks are counted in ``expired``. Every operation costs
    O(1) per plan it queues, serves or drops, however many plans are queued.
    """

    def __init__(self, ttl: float = PLAN_TTL_S, max_items: int = MAX_QUEUED) -> None:
        self.ttl, self.max_items = ttl, max_items
        self._plans: OrderedDict[Hashable, tuple[float, deque[PrefetchItem]]] = OrderedDict()  # turns
        self._ages: dict[Hashable, None] = {}  # the same plans, oldest first
        self._size = 0
        self._ready = asyncio.Event()
        self.expired = 0

    def __len__(self) -> int:
        return self._size

    def replace(self, key: Hashable, items: Sequence[PrefetchItem]) -> int:
        """Queue ``items`` as ``key``'s plan; return how many items of its previous plan were dropped."""
        dropped = self._drop(key)
        if items:
            self._plans[key] = (time.monotonic(), deque(items))
            self._ages[key] = None
            self._size += len(items)
            self._ready.set()
        while self._size > self.max_items:
            self.expired += self._drop(next(iter(self._ages)))
        return dropped

    def expire(self) -> int:
        """Drop the plans older than ``ttl``; return how many blocks they still held."""
        cutoff = time.monotonic() - self.ttl
        dropped = 0
        while self._ages and self._plans[oldest := next(iter(self._ages))][0] < cutoff:
            dropped += self._drop(oldest)
        self.expired += dropped
        return dropped

    def clear(self) -> int:
        dropped = self._size
        self._plans.clear()
        self._ages.clear()
        self._size = 0
        return dropped

    def _drop(self, key: Hashable) -> int:
        _, plan = self._plans.pop(key, (0.0, ()))
        self._ages.pop(key, None)
        self._size -= len(plan)
        return len(plan)

    async def get(self) -> PrefetchItem:
        """The next item, from the plan after the one served last (plans past their ``ttl`` skipped)."""
        while True:
            while not self._plans:
                self._ready.clear()
                await self._ready.wait()
            key, (made, plan) = next(iter(self._plans.items()))
            if time.monotonic() - made > self.ttl:
                self.expired += self._drop(key)
                continue
            item = plan.popleft()
            self._size -= 1
            if plan:
                self._plans.move_to_end(key)  # back of the line
            else:
                self._drop(key)
            return item

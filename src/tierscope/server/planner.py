"""Server-side prefetch planning, on a thread of its own.

The service's event loop must do bounded work per request, but moving a position (scoring the
predictors on the new view) and planning around it grow with the plan and the grid. So the loop only
hands each request's view over (``Planner.observe``: a lock and a dict entry), and one planning thread,
which alone owns the positions (``Sessions``), observes and plans, then hands the result back to the
loop (``deliver``, which the service makes a ``loop.call_soon_threadsafe``): the loop owns the prefetch
queue and the tiers, and applies the result in O(1).

A position whose newer view arrives before its older one was taken is observed once, at the newest view.
At most ``max_pending`` views wait; beyond that the oldest are dropped (a plan is for the view after the
current one: an old view's plan is stale anyway). The thread shares the GIL with the loop: after each
plan it rests as long as the plan took it (``REST``), and a view that repeats its position's last one does
not wake it (``observe(wake=False)``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tierscope.cache import TierCache, Views, entry_charge
from tierscope.metadata import VariableInfo
from tierscope.prefetch import Box, Position, radius_for
from tierscope.server.sessions import PositionKey, PrefetchItem, Sessions

__all__ = ["Delivery", "Planned", "Planner", "TierRoom", "View"]

logger = logging.getLogger(__name__)

THREAD_NAME = "tierscope-planner"
# After making a plan the thread rests this many times as long as the plan took it (CPU time), GIL and
# CPU free for the loop: planning, mostly Python holding the GIL, then takes at most half of either,
# however fast views move; views that arrive meanwhile coalesce to each position's newest.
REST = 1.0


@dataclass(frozen=True, slots=True)
class TierRoom:
    """A tier as the loop saw it when a view arrived: what its prefetch radius is computed from."""

    capacity: int
    nbytes: int
    blocks: int
    policy: str

    @classmethod
    def of(cls, tier: TierCache) -> TierRoom:
        return cls(tier.capacity, tier.size, len(tier), tier.policy)

    def radius(self, variable: VariableInfo, pos: Position) -> int:
        """The hops around ``pos``'s view whose blocks fit, at the tier's average block size (before it
        holds anything, a raw block's: pessimistic for frames)."""
        if self.capacity == 0:
            return 0
        raw_nbytes = math.prod(variable.block) * variable.dtype.itemsize
        average = self.nbytes / self.blocks if self.blocks else entry_charge(raw_nbytes, self.policy)
        return radius_for(variable.grid, self.capacity, average, pos.time_axis, view=pos.box.extents)


@dataclass(frozen=True, slots=True)
class View:
    """One request's view of a position, with all that planning needs: the planner asks the loop nothing."""

    key: PositionKey  # (session, dataset, variable, tol)
    variable: VariableInfo
    box: Box  # checked against the grid on the loop
    codec: str
    mode: str  # the prefetch mode; "off": only track the position (for the distance policy)
    distance: bool  # the tiers evict by distance: hand back the views of variables whose views changed
    l3: TierRoom
    l4: TierRoom
    limit: int  # blocks per plan at most
    epoch: int  # the service's configuration: views and results of an older one are dropped


@dataclass(frozen=True, slots=True)
class Planned:
    """What one view changed, for the loop to apply."""

    key: PositionKey
    epoch: int
    dropped: PositionKey | None  # the position this one pushed out of the table: its plan goes
    items: list[PrefetchItem] | None  # the position's new plan; None: it did not move, or no prefetch
    views: dict[tuple[str, str], Views | None]  # (dataset, variable) -> its current views, when changed


@dataclass(frozen=True, slots=True)
class Delivery:
    """A result handed to the loop: ``done`` views were finished (observed or dropped) so far, in order."""

    planned: Planned | None
    done: int
    positions: int
    epoch: int


class Planner:
    """The positions and their plans, on one thread: ``observe`` from the loop, results to ``deliver``."""

    def __init__(self, deliver: Callable[[Delivery], object], max_positions: int = 1024,
                 max_pending: int = 1024) -> None:
        self.sessions = Sessions(max_positions)  # the planning thread's alone
        self.max_pending = max_pending
        self._deliver = deliver
        self._ready = threading.Condition()  # guards what follows, shared by the loop and the thread
        self._pending: OrderedDict[PositionKey, View] = OrderedDict()
        self._issued = self._done = 0  # views queued (a coalesced one is not new), views finished
        self._stopping = False
        self._epoch = 0  # the planning thread's
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)

    @property
    def issued(self) -> int:
        """Views queued so far: when ``Delivery.done`` reaches this, all of them have been handed back."""
        with self._ready:
            return self._issued

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the view being planned, drop the rest, and end the thread."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def observe(self, view: View, wake: bool = True) -> None:
        """Queue ``view`` for planning (O(1)): it replaces a view of the same position still waiting.

        ``wake=False``: the view repeats its position's last one, so it changes nothing but the table's
        order of recency; it waits for the next view that wakes the thread (or ``wake``). Waking the
        thread for each request was a context switch per request, in which the loop, holding the GIL,
        often lost its CPU to the thread it woke."""
        with self._ready:
            if view.key not in self._pending:
                self._issued += 1
            self._pending[view.key] = view
            while len(self._pending) > self.max_pending:
                self._pending.popitem(last=False)
                self._done += 1
            if wake:
                self._ready.notify()

    def wake(self) -> None:
        """Have the thread take the views waiting (those queued without waking it)."""
        with self._ready:
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._stopping:
                    self._ready.wait()
                if self._stopping:
                    return
                _, view = self._pending.popitem(last=False)
            started = time.thread_time()
            try:
                planned = self._observe(view)
            except Exception:  # a bad view must never stop planning
                logger.warning("planning %s failed", view.key, exc_info=True)
                planned = None
            with self._ready:
                self._done += 1
                done, idle = self._done, not self._pending
            if planned is not None or idle:  # a plan goes at once; views that changed nothing, when idle
                self._deliver(Delivery(planned, done, len(self.sessions), self._epoch))
            if planned is not None and planned.items:
                time.sleep((time.thread_time() - started) * REST)

    def _observe(self, view: View) -> Planned | None:
        """Move ``view``'s position; its new plan and the views that changed, or None if nothing did."""
        if view.epoch < self._epoch:
            return None
        if view.epoch > self._epoch:  # the service was reconfigured: positions start over
            self.sessions.clear()
            self._epoch = view.epoch
        variable = view.variable
        pos, dropped = self.sessions.position(view.key, variable.grid, variable.time_axis)
        moved = pos.observe_box(view.box, score=view.mode == "auto")
        if not moved and dropped is None:
            return None
        if moved:
            self.sessions.moved(*view.key[1:3])
        changed = [key[1:3] for key in (view.key if moved else None, dropped) if key is not None]
        views = {group: self.sessions.views(group) for group in changed} if view.distance else {}
        items = self._plan(view, pos) if moved and view.mode != "off" else None
        return Planned(view.key, view.epoch, dropped, items, views)

    @staticmethod
    def _plan(view: View, pos: Position) -> list[PrefetchItem]:
        """The blocks around the new view that fit L3 and L4, nearest/most likely first."""
        session, dataset, variable, tol = view.key
        r3 = view.l3.radius(view.variable, pos)
        blocks = pos.plan(view.mode, max(r3, view.l4.radius(view.variable, pos)), limit=view.limit)
        # plan() stays within the larger radius: each block goes to L4, and to L3 when near enough
        return [PrefetchItem(dataset, variable, index, tol, view.codec, near)
                for index, near in zip(blocks, pos.within(blocks, r3), strict=True)]

"""Server-side prefetch planning, on a thread of its own.

The service's event loop must do bounded work per request, but moving a position (scoring the
predictors on the new view) and planning around it grow with the plan and the grid. So the loop only
hands each request's view over (``Planner.observe``: a lock and a dict entry), and one planning thread,
which alone owns the positions (``Sessions``), observes and plans, then hands the result back to the
loop (``deliver``, which the service makes a ``loop.call_soon_threadsafe``): the loop owns the prefetch
queue and the tiers, and applies the result in O(1).

The queue and the thread are ``tierscope.planning.PlanningThread``'s (shared with the scheduler plugin):
a position whose newer view arrives before its older one was taken is observed once, at the newest view,
at most ``max_pending`` views wait (the oldest are dropped), and after each plan the thread rests as long
as the plan took it (``planning.REST``: it shares the GIL with the loop). A view that repeats its
position's last one does not wake the thread (``observe(wake=False)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from tierscope.cache import TierCache, Views, entry_charge
from tierscope.metadata import VariableInfo
from tierscope.planning import PlanningThread
from tierscope.prefetch import Box, Position, radius_for
from tierscope.server.sessions import PositionKey, PrefetchItem, Sessions

__all__ = ["Delivery", "Planned", "Planner", "TierRoom", "View"]

THREAD_NAME = "tierscope-planner"


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
        self._deliver = deliver
        self._epoch = 0  # the planning thread's
        self._thread: PlanningThread[PositionKey, View, Planned] = PlanningThread(
            self._observe, self._hand_back, THREAD_NAME, max_pending)

    @property
    def issued(self) -> int:
        """Views queued so far: when ``Delivery.done`` reaches this, all of them have been handed back."""
        return self._thread.issued

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the view being planned, drop the rest, and end the thread."""
        self._thread.stop()

    def observe(self, view: View, wake: bool = True) -> None:
        """Queue ``view`` for planning (O(1)): it replaces a view of the same position still waiting.

        ``wake=False``: the view repeats its position's last one, so it changes nothing but the table's
        order of recency; it waits for the next view that wakes the thread (or ``wake``). Waking the
        thread for each request was a context switch per request, in which the loop, holding the GIL,
        often lost its CPU to the thread it woke."""
        self._thread.submit(view.key, view, wake=wake)

    def wake(self) -> None:
        """Have the thread take the views waiting (those queued without waking it)."""
        self._thread.wake()

    def _hand_back(self, planned: Planned | None, done: int) -> None:
        self._deliver(Delivery(planned, done, len(self.sessions), self._epoch))

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

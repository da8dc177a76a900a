"""A planning thread: an event loop hands work over in O(1), one thread does it, results go back.

Both hosts of prefetch planning use it — the block server (``server.planner``) and the scheduler plugin
(``dask.scheduler``) — because both event loops must do bounded work per request or view, while moving
a position and planning around it grow with the plan. The thread alone owns what it plans with (the
positions); the loop only queues an item (``submit``: a lock and a dict entry) and applies what the
thread hands to ``deliver`` (which the host makes a ``loop.call_soon_threadsafe``).

Waiting items are keyed by position: a newer item of a key still waiting replaces the older one in its
place in the queue, so a position is planned once, at its newest view. At most ``max_pending`` items
wait; beyond that the oldest are dropped (a plan is for the view after the current one: an old view's
plan is stale anyway). ``call`` runs a function on the thread before the next item: how the loop changes
what the thread owns without touching it.

The thread shares the GIL with the loop, and planning is mostly Python that holds it: after each item
it rests ``REST`` times as long as the item took it (CPU time), so planning takes at most half of the
GIL and a CPU however fast views move (views arriving meanwhile coalesce to each position's newest).
An item submitted with ``wake=False`` waits for the next one that wakes the thread: a host submits a
view that repeats its position's last one that way, since waking the thread per request cost the loop,
holding the GIL, its CPU to the thread it woke.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["PlanningThread"]

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
R = TypeVar("R")

REST = 1.0  # after each item, rest this many times the CPU time it took


class PlanningThread(Generic[K, V, R]):
    """``plan`` of each submitted item on one thread; its results (and, when idle, None) to ``deliver``.

    ``deliver(result, done)`` runs on the planning thread after each item whose result is not None, and
    after any item that leaves nothing waiting: ``done`` items were finished (planned or dropped) so far,
    in order — when it reaches ``issued``, every item submitted until then has been handed back.
    """

    def __init__(self, plan: Callable[[V], R | None], deliver: Callable[[R | None, int], object], name: str,
                 max_pending: int = 1024) -> None:
        self.max_pending = max_pending
        self._plan, self._deliver = plan, deliver
        self._ready = threading.Condition()  # guards what follows, shared by the loop and the thread
        self._pending: OrderedDict[K, V] = OrderedDict()
        self._calls: list[Callable[[], R | None]] = []
        self._issued = self._done = 0  # items queued (a replacing one is not new), items finished
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def issued(self) -> int:
        """Items queued so far (those that replaced a waiting one not counted)."""
        with self._ready:
            return self._issued

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the item being planned, drop the rest, and end the thread."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, key: K, item: V, wake: bool = True) -> None:
        """Queue ``item`` (O(1)): it replaces an item of the same key still waiting. ``wake=False``: it
        waits for the next item (or ``wake``) that wakes the thread."""
        with self._ready:
            if key not in self._pending:
                self._issued += 1
            self._pending[key] = item
            while len(self._pending) > self.max_pending:
                self._pending.popitem(last=False)
                self._done += 1
            if wake:
                self._ready.notify()

    def wake(self) -> None:
        """Have the thread take the items waiting (those queued without waking it)."""
        with self._ready:
            self._ready.notify()

    def call(self, fn: Callable[[], R | None], drop: Callable[[K], bool]) -> None:
        """Run ``fn`` on the thread before the next item, its result delivered like a plan's; first drop
        the waiting items whose key ``drop`` matches (they would undo what ``fn`` does). O(waiting)."""
        with self._ready:
            for key in [k for k in self._pending if drop(k)]:
                del self._pending[key]
                self._done += 1
            self._calls.append(fn)
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not (self._pending or self._calls or self._stopping):
                    self._ready.wait()
                if self._stopping:
                    return
                if self._calls:
                    what, work, counted = "a call", self._calls.pop(0), False
                else:
                    key, queued = self._pending.popitem(last=False)
                    what, work, counted = repr(key), functools.partial(self._plan, queued), True
            started = time.thread_time()
            try:
                result = work()
            except Exception:  # a bad item must never stop planning
                logger.warning("planning %s on %s failed", what, self._thread.name, exc_info=True)
                result = None
            with self._ready:
                self._done += counted  # calls are not counted in ``issued``
                done, idle = self._done, not (self._pending or self._calls)
            if result is not None or idle:  # a result goes at once; items that changed nothing, when idle
                self._deliver(result, done)
            if counted and result is not None:
                time.sleep((time.thread_time() - started) * REST)

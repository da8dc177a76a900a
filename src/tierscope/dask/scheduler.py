"""The scheduler plugin: knows where each session is in block space, places loads, dispatches prefetch.

From every ``update_graph`` it picks out tierscope's block-load tasks (``BlockLoadTask``; their keys are
``(name, *block_index)``), and for each (client, dataset, variable, tol):
- on the scheduler's event loop, it pins each load to the block's owner worker — rendezvous hashing of the
  block's *spatial* index over the current workers, so a time scrub stays on one worker and few blocks
  move when workers come and go — as a loose restriction (the load still runs elsewhere if the owner is
  gone); then hands the view, with a snapshot of the workers (addresses, tier capacities, measured block
  size: O(workers)), to the planning thread (``tierscope.planning.PlanningThread``) in O(1);
- on the planning thread (``ViewPlanner``, which alone owns the positions, the coarse levels' planner and
  its own owner memo), it feeds the view to a ``tierscope.prefetch.Position`` and, when the view is new,
  plans the blocks to load next within the radius that fits the workers' L1 (decoded) and L2 (encoded)
  tiers, and for a dataset with levels the coarser levels around the same view too
  (``tierscope.dask.coarse``), each as its own position within a share of the tiers;
- back on the loop, it sends every worker its share of each plan (a stream message, no round trip) with
  a new epoch; an empty share still tells the worker the new position, so its queued remainder of older
  plans is cancelled.
The loop's work per view is bounded by the number of workers; the planning thread's by ``max_plan`` blocks
per view and ``max_coarse`` for all coarse levels together. A position whose newer view arrives before
the thread took the older one is planned once, at the newest view; at most ``max_pending`` views wait.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.serialize import ToPickle

from tierscope import config
from tierscope._compat import keep_from_stealing, set_stream_handler
from tierscope.cache import entry_charge
from tierscope.config import tier_bytes
from tierscope.dask.coarse import COUNTS, L1_SHARE, L2_SHARE, CoarsePlanner, add_counts
from tierscope.dask.graph import BlockLoadTask, ReportedBlockLoadTask
from tierscope.dask.observe import install
from tierscope.dask.prefetcher import Plan
from tierscope.dask.tiers import PLUGIN_NAME
from tierscope.grid import BlockIndex
from tierscope.planning import PlanningThread
from tierscope.prefetch import Box, Position, check_mode, radius_for
from tierscope.protocol import PLAN_OP, VIEW_OP, BlockSpec
from tierscope.server.stats import Distribution

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = ["SCHEDULER_PLUGIN_NAME", "THREAD_NAME", "TierscopeSchedulerPlugin", "ViewPlanner", "owner_of"]

logger = logging.getLogger(__name__)

SCHEDULER_PLUGIN_NAME = "tierscope-prefetch"
THREAD_NAME = "tierscope-scheduler-planner"
MAX_OWNERS = 1 << 16  # remembered owners (dataset, spatial index) for the current workers
PositionKey = tuple[str, BlockSpec]  # (client, spec)


def owner_of(spec: BlockSpec, index: BlockIndex, workers: Sequence[str]) -> str:
    """The block's owner: highest random weight over ``workers`` of its dataset and spatial index."""
    return _rendezvous(spec.source.url, tuple(i for axis, i in enumerate(index) if axis != spec.time_axis),
                       workers)


def _rendezvous(url: str, spatial: tuple[int, ...], workers: Sequence[str]) -> str:
    block = f"{url}|{spatial}".encode()

    def weight(worker: str) -> bytes:
        return hashlib.blake2b(block + b"|" + worker.encode(), digest_size=8).digest()

    return max(workers, key=weight)


class Owners:
    """``owner_of`` over the current workers, remembered per (dataset, spatial index): a plan's blocks
    share few spatial indices (a time scrub none new), and each hash costs one digest per worker. The loop
    (placement, ``of``) and the planning thread (plans, ``columns``) each have their own."""

    def __init__(self) -> None:
        self.workers: tuple[str, ...] = ()
        self._memo: dict[tuple, str] = {}

    def current(self, workers: Sequence[str]) -> tuple[str, ...]:
        """Hash over ``workers`` (sorted addresses) from now on; remembered owners go when they change."""
        workers = tuple(workers)
        if workers != self.workers:
            self.workers, self._memo = workers, {}
        return self.workers

    def of(self, spec: BlockSpec, index: BlockIndex) -> str:
        """The block's owner among the current workers."""
        t = spec.time_axis
        return self._owner(spec.source.url, index if t is None else index[:t] + index[t + 1:])

    def columns(self, spec: BlockSpec, blocks: np.ndarray) -> np.ndarray:
        """Each block of an (n, ndim) array's owner, as its position in ``workers``: one lookup per
        distinct spatial index (found on flat indices: one integer sort), the rest vectorised."""
        t = spec.time_axis
        spatial = blocks if t is None else np.delete(blocks, t, axis=1)
        dims = tuple(n for a, n in enumerate(spec.grid.nblocks) if a != t)
        flat = np.ravel_multi_index(tuple(spatial.T), dims) if dims else np.zeros(len(blocks), dtype=np.int64)
        distinct, inverse = np.unique(flat, return_inverse=True)
        url, column = spec.source.url, {w: i for i, w in enumerate(self.workers)}
        indices = zip(*(axis.tolist() for axis in np.unravel_index(distinct, dims))) if dims else [()]
        owners = np.array([column[self._owner(url, index)] for index in indices], dtype=np.int64)
        return owners[inverse.ravel()]

    def _owner(self, url: str, spatial: tuple[int, ...]) -> str:
        key = (url, spatial)
        owner = self._memo.get(key)
        if owner is None:
            if len(self._memo) >= MAX_OWNERS:
                self._memo.clear()
            owner = self._memo[key] = _rendezvous(url, spatial, self.workers)
        return owner


@dataclass(frozen=True, slots=True)
class Room:
    """The workers as the loop saw them when a view arrived: all that planning reads of the scheduler."""

    workers: tuple[str, ...]  # sorted addresses: owners hash over these
    targets: tuple[str, ...]  # those whose tierscope plugin takes plans
    l1: dict[str, int]  # each worker's tier capacity, bytes
    l2: dict[str, int]
    decoded: float  # what L1 charges per block of the view's level
    encoded: float  # the workers' measured average L2 (encoded) block; ``decoded`` before any


@dataclass(frozen=True, slots=True)
class View:
    """One view of one position, handed from the loop to the planning thread."""

    client: str
    spec: BlockSpec
    box: Box
    room: Room


@dataclass(frozen=True, slots=True)
class PositionSummary:
    """What the dashboard shows of a position (the planning thread owns the position itself)."""

    box: Box
    views: int
    predictor: str


@dataclass(frozen=True, slots=True)
class Planned:
    """What the planning thread hands back to the loop: a view's plans, or a client's positions forgotten."""

    key: PositionKey | None  # the position that moved; None: a client was forgotten
    summary: PositionSummary | None
    dropped: tuple[PositionKey, ...]  # positions no longer held (pushed out, or their client closed)
    plans: tuple[tuple[str, Plan], ...]  # (worker, plan) to send, in order
    planned: int | None  # blocks planned at the view's own level; None: no plan made for it
    coarse: dict[str, int] | None  # the coarse levels' counts for this view (``CoarsePlanner.last``)
    wall_s: float  # the planning thread's work on the view
    cpu_s: float


class ViewPlanner:
    """The scheduler plugin's positions and plans. Runs on the planning thread, which alone owns the
    positions, the coarse levels' planner, the owner memo and the plans' epochs; it reads the scheduler
    only through each view's ``Room``."""

    def __init__(self, mode: str, max_plan: int = 512, max_coarse: int = 1024,
                 max_positions: int = 256) -> None:
        self.mode, self.max_plan, self.max_positions = check_mode(mode), max_plan, max_positions
        self.positions: OrderedDict[PositionKey, Position] = OrderedDict()
        self.coarse = CoarsePlanner(max_coarse)
        self.owners = Owners()
        self.epoch = 0

    def plan(self, view: View) -> Planned | None:
        """Move the view's position; when it moved, the plans for its level and the coarser ones."""
        started, cpu_started = time.perf_counter(), time.thread_time()
        client, spec, room = view.client, view.spec, view.room
        pos, dropped = self._position((client, spec))
        if not pos.observe_box(view.box, score=self.mode == "auto"):
            return None
        plans: list[tuple[str, Plan]] = []
        planned = coarse = None
        if room.targets:
            self.owners.current(room.workers)
            blocks, r1 = self._plan(spec, pos, room)
            planned = None if self.mode == "off" else len(blocks)
            plans += self._plans(room.targets, client, spec, view.box, self._shares(spec, pos, blocks, r1))
            self.coarse.forget(client, spec)  # a coarse plan for this level's position was just replaced
            if self.mode != "off" and spec.levels > spec.level + 1:
                for level in self.coarse.plan(client, spec, view.box, room.l1, room.l2,
                                              room.encoded / room.decoded, self.owners.columns):
                    plans += self._plans(room.targets, client, level.spec, level.box, level.shares)
                coarse = self.coarse.last
        summary = PositionSummary(pos.box, pos.views, pos.chosen())
        return Planned((client, spec), summary, dropped, tuple(plans), planned, coarse,
                       time.perf_counter() - started, time.thread_time() - cpu_started)

    def forget(self, client: str) -> Planned | None:
        """A closed client's positions and coarse plans go."""
        dropped = tuple(k for k in self.positions if k[0] == client)
        for key in dropped:
            del self.positions[key]
        self.coarse.forget_client(client)
        return Planned(None, None, dropped, (), None, None, 0.0, 0.0) if dropped else None

    def _position(self, key: PositionKey) -> tuple[Position, tuple[PositionKey, ...]]:
        """The position, made if new; and the least recent ones it pushed out of the table."""
        pos, dropped = self.positions.get(key), []
        if pos is None:
            spec = key[1]
            pos = self.positions[key] = Position(spec.grid, spec.time_axis)
            while len(self.positions) > self.max_positions:
                dropped.append(self.positions.popitem(last=False)[0])
        self.positions.move_to_end(key)
        return pos, tuple(dropped)

    def _plan(self, spec: BlockSpec, pos: Position, room: Room) -> tuple[list[BlockIndex], int]:
        """The blocks to prefetch for a new view, and the L1 radius (blocks within it get decoded).

        With coarser levels to plan too, the view's own level keeps what their shares leave."""
        if self.mode == "off":
            return [], 0
        extents = pos.box.extents
        coarse = spec.levels > spec.level + 1
        l1 = sum(room.l1.values()) * (1 - L1_SHARE if coarse else 1)
        l2 = sum(room.l2.values()) * (1 - L2_SHARE if coarse else 1)
        r1 = radius_for(spec.grid, int(l1), room.decoded, spec.time_axis, view=extents)
        r2 = radius_for(spec.grid, int(l2), room.encoded, spec.time_axis, view=extents)
        return pos.plan(self.mode, max(r1, r2), limit=self.max_plan), r1

    def _shares(self, spec: BlockSpec, pos: Position, blocks: list[BlockIndex],
                r1: int) -> dict[str, list[tuple[BlockIndex, bool]]]:
        """Each owner's blocks of the view's own plan, in plan order, each decoded when within ``r1``."""
        indices = np.array(blocks, dtype=np.int64).reshape(-1, spec.grid.ndim)
        near = (pos.box.distances(indices, pos.time_axis) <= r1).tolist()
        who = self.owners.columns(spec, indices)
        return {w: [(blocks[j], near[j]) for j in np.flatnonzero(who == i).tolist()]
                for i, w in enumerate(self.owners.workers)}

    def _plans(
        self, targets: Sequence[str], client: str, spec: BlockSpec, view: Box,
        shares: dict[str, list[tuple[BlockIndex, bool]]],
    ) -> list[tuple[str, Plan]]:
        """One plan for one position: every target worker its share (maybe empty) under a new epoch."""
        self.epoch += 1
        plans = []
        for worker in targets:
            blocks, decode = zip(*share) if (share := shares.get(worker)) else ((), ())
            plans.append((worker, Plan(epoch=self.epoch, session=client, spec=spec, view=(view.lo, view.hi),
                                       blocks=blocks, decode=decode)))
        return plans


def _forward_view(scheduler: Scheduler, client: str, **msg: Any) -> None:
    """The scheduler's ``tierscope-view`` stream handler: to the current plugin, or nowhere."""
    plugin = scheduler.plugins.get(SCHEDULER_PLUGIN_NAME)
    if isinstance(plugin, TierscopeSchedulerPlugin):
        plugin.on_reported_view(client, msg)


class TierscopeSchedulerPlugin(SchedulerPlugin):
    """Position tracking, owner placement and prefetch dispatch for tierscope's block loads."""

    name = SCHEDULER_PLUGIN_NAME

    def __init__(
        self,
        prefetch: str | None = None,
        l1: int | float | str | None = None,
        l2: int | float | str | None = None,
        max_plan: int = 512,
        max_coarse: int = 1024,
        max_positions: int = 256,
        equipped: Sequence[str] = (),
        install_workers: bool = False,
        max_pending: int = 256,
    ) -> None:
        self.mode = check_mode(config.get("prefetch") if prefetch is None else prefetch)
        # Workers known to run the tierscope worker plugin (``connect`` registered it there); others
        # prove it by their heartbeat's tierscope metrics. Only those get plans: a worker without the
        # handler would drop its connection to the scheduler on an unknown stream op.
        self._equipped = set(equipped)
        self._install_workers = install_workers  # a preloaded plugin brings its worker twin itself
        self._owners = Owners()  # the loop's, for placement
        # Tier sizes the workers were given (bytes or fractions of memory; None: dask.config's), for
        # workers whose heartbeat has not yet said their tiers' capacity.
        self.l1 = config.get("l1") if l1 is None else l1
        self.l2 = config.get("l2") if l2 is None else l2
        self.scheduler: Scheduler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.max_plan, self.max_coarse, self.max_positions = max_plan, max_coarse, max_positions
        self.max_pending = max_pending
        # Made in ``start`` (the plugin travels to the scheduler pickled, a thread cannot): the planning
        # thread, and its ``ViewPlanner.forget``, which only the thread calls.
        self._thread: PlanningThread[PositionKey, View, Planned] | None = None
        self._forget: Callable[[str], Planned | None] | None = None
        # The loop's: the planner's positions as it last handed them back (the dashboard's sessions).
        self.positions: dict[PositionKey, PositionSummary] = {}
        self._planned = 0  # views the planning thread has finished, as it last said
        self._settling: list[tuple[int, asyncio.Future[None]]] = []  # (views to finish, waiter)
        self._submitted: dict[Any, float] = {}
        self._queue = Distribution()
        self._view_s = Distribution()  # the loop's work per view (the hand-over), wall time
        self._view_cpu_s = Distribution()  # the same in CPU time of the loop's thread: work, not waits
        self._plan_s = Distribution()  # the planning thread's work per new view, wall time
        self._plan_cpu_s = Distribution()  # the same in CPU time of the planning thread
        self.counts = {"views": 0, "loads": 0, "plans": 0, "planned": 0}
        self._coarse_counts = dict.fromkeys(COUNTS, 0)

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._loop = asyncio.get_running_loop()
        planner = ViewPlanner(self.mode, self.max_plan, self.max_coarse, self.max_positions)  # the thread's
        self._forget = planner.forget
        self._thread = PlanningThread(planner.plan, self._hand_back, THREAD_NAME, self.max_pending)
        self._thread.start()
        # Stays when this plugin goes: a client's view message must never meet a missing handler (the
        # scheduler would close that client's stream); it reaches whichever tierscope plugin is current.
        set_stream_handler(scheduler, VIEW_OP, functools.partial(_forward_view, scheduler))
        install(scheduler)  # the /tierscope page and the /metrics series
        if self._install_workers:  # every current and future worker, unless a client already did
            from distributed.protocol.pickle import dumps

            from tierscope.dask.plugin import TierscopeWorkerPlugin

            await scheduler.register_worker_plugin(None, dumps(TierscopeWorkerPlugin()), name=PLUGIN_NAME,
                                                   idempotent=True)

    async def close(self) -> None:
        """Ends the planning thread (after the view it is planning): the scheduler closes, or ``connect``
        replaces this plugin."""
        if self._thread is not None:
            self._thread.stop()

    def update_graph(self, scheduler: Scheduler, *, client: str, tasks: list, **kwargs: Any) -> None:
        now = time.time()
        views: defaultdict[BlockSpec, list[tuple[Any, BlockIndex]]] = defaultdict(list)
        for key in tasks:
            ts = scheduler.tasks.get(key)
            if ts is not None and isinstance(ts.run_spec, BlockLoadTask):
                spec, index = ts.run_spec.args
                views[spec].append((ts, tuple(index)))
        if not views:
            return
        workers = self._owners.current(sorted(scheduler.workers))
        for spec, loads in views.items():
            for ts, index in loads:
                if workers:
                    ts.worker_restrictions = {self._owners.of(spec, index)}
                    ts.loose_restrictions = True
                if ts.state != "memory":  # a held result makes no transition: nothing would pop it
                    self._submitted[ts.key] = now
            self.counts["loads"] += len(loads)
            if not all(isinstance(ts.run_spec, ReportedBlockLoadTask) for ts, _ in loads):
                self._on_view(scheduler, client, spec, Box.of(index for _, index in loads), workers)

    def on_reported_view(self, client: str, msg: dict[str, Any]) -> None:
        """A view a client read directly from its owners' tiers (``tierscope.dask.direct``): no graph came.

        Anything raised here would close the client's stream (and drop its futures): a malformed
        message is logged and ignored.
        """
        try:
            spec = msg["spec"]
            spec = spec.data if isinstance(spec, ToPickle) else spec
            if self.scheduler is None or not isinstance(spec, BlockSpec):
                raise TypeError(f"spec is a {type(spec).__name__}, not a BlockSpec")
            lo, hi = (spec.grid.check(corner) for corner in msg["box"])
            self._on_view(self.scheduler, client, spec, Box(lo, hi),
                          self._owners.current(sorted(self.scheduler.workers)))
        except Exception as exc:
            logger.warning("ignored a malformed %s message from %s: %r", VIEW_OP, client, exc)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        """Keeps user loads on their owners; measures their queue time (graph arrival to load start)."""
        if finish == "processing" and key in self._submitted:
            self._unstealable(key)
        if finish in ("waiting", "queued", "processing", "no-worker"):
            return
        submitted = self._submitted.pop(key, None)
        if submitted is None or finish != "memory":
            return
        for ss in kwargs.get("startstops", ()):
            if ss.get("action") == "compute":
                self._queue.add(max(ss["start"] - submitted, 0.0))
                break

    def _unstealable(self, key: Any) -> None:
        """Work stealing may move a loosely restricted task to any idle worker; a block load moved off its
        owner fills the wrong worker's L1. Runs after the stealing plugin's own transition hook (it was
        added first), which has just offered the task for stealing; and takes it off the stealing
        plugin's list of tasks to re-offer once their prefix's duration is known."""
        ts = self.scheduler.tasks.get(key) if self.scheduler is not None else None
        if ts is not None:
            keep_from_stealing(self.scheduler, ts)

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        self._equipped.discard(worker)

    def _handles_plans(self, scheduler: Scheduler, worker: str) -> bool:
        ws = scheduler.workers.get(worker)
        return worker in self._equipped or (ws is not None and bool(ws.metrics.get("tierscope")))

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        """A closed notebook's positions go with it: the planning thread, which owns them, forgets them
        before its next view (the client's views still waiting are dropped)."""
        if self._thread is not None:
            self._thread.call(functools.partial(self._forget, client), lambda key: key[0] == client)

    def _on_view(
        self, scheduler: Scheduler, client: str, spec: BlockSpec, view: Box, workers: Sequence[str]
    ) -> None:
        """Hand the view to the planning thread, with all it needs to know of the workers: O(workers)."""
        started, cpu_started = time.perf_counter(), time.thread_time()
        self._thread.submit((client, spec), View(client, spec, view, self._room(scheduler, spec, workers)))
        self._view_s.add(time.perf_counter() - started)
        self._view_cpu_s.add(time.thread_time() - cpu_started)

    def _room(self, scheduler: Scheduler, spec: BlockSpec, workers: Sequence[str]) -> Room:
        """What planning a view of ``spec`` needs to know of the workers, read on the loop."""
        decoded, encoded = self._block_nbytes(scheduler, spec)
        return Room(tuple(workers), tuple(w for w in workers if self._handles_plans(scheduler, w)),
                    self._capacities(scheduler, "l1"), self._capacities(scheduler, "l2"), decoded, encoded)

    def _hand_back(self, planned: Planned | None, done: int) -> None:
        """On the planning thread: its result to the loop."""
        try:
            self._loop.call_soon_threadsafe(self._apply, planned, done)
        except RuntimeError:  # the loop closed: the scheduler is gone, nobody waits for plans
            pass

    def _apply(self, planned: Planned | None, done: int) -> None:
        """The planning thread's result, on the loop: the plans go to their workers (those still there),
        the positions shown and the stats are updated. O(workers x levels)."""
        if planned is not None:
            for key in planned.dropped:
                self.positions.pop(key, None)
            if planned.key is not None:
                self.positions[planned.key] = planned.summary
                self.counts["views"] += 1
                self._plan_s.add(planned.wall_s)
                self._plan_cpu_s.add(planned.cpu_s)
            if planned.planned is not None:
                self.counts["plans"] += 1
                self.counts["planned"] += planned.planned
            if planned.coarse is not None:
                add_counts(self._coarse_counts, planned.coarse)
            workers = self.scheduler.workers
            for worker, plan in planned.plans:
                if worker in workers:  # it may have left since the view
                    self.scheduler.worker_send(worker, {"op": PLAN_OP, "plan": ToPickle(plan)})
        self._planned = done
        while self._settling and self._settling[0][0] <= done:
            _, waiter = self._settling.pop(0)
            if not waiter.done():
                waiter.set_result(None)

    async def settled(self) -> None:
        """Wait until the planning thread has handed back every view handed to it so far: then the
        stats count their plans and the workers have been sent them."""
        target = self._thread.issued if self._thread is not None else 0
        if target > self._planned:
            waiter = asyncio.get_running_loop().create_future()
            self._settling.append((target, waiter))
            await waiter

    def _capacities(self, scheduler: Scheduler, tier: str) -> dict[str, int]:
        """A tier's capacity on each worker: what its heartbeat reports, else its configured size (a
        fraction of memory resolved against that worker's memory limit)."""
        configured = self.l1 if tier == "l1" else self.l2
        capacities = {}
        for address, ws in scheduler.workers.items():
            reported = ws.metrics.get("tierscope", {}).get(tier, {}).get("capacity")
            capacities[address] = (reported if reported is not None
                                   else tier_bytes(configured, ws.memory_limit, tier))
        return capacities

    def _block_nbytes(self, scheduler: Scheduler, spec: BlockSpec) -> tuple[float, float]:
        """Decoded block size (exact) and the workers' measured average encoded (L2) block size."""
        decoded = entry_charge(spec.block_nbytes, "distance")  # what L1 charges per block, at most
        blocks = nbytes = 0
        for ws in scheduler.workers.values():
            l2 = ws.metrics.get("tierscope", {}).get("l2", {})
            blocks += l2.get("blocks", 0)
            nbytes += l2.get("nbytes", 0)
        return float(decoded), (nbytes / blocks if blocks else float(decoded))

    def stats(self) -> dict[str, Any]:
        """Views seen, plans sent, the queue-time distribution of user loads, and the plugin's own work per
        view: on the scheduler's loop (the hand-over), ``view_s`` in wall time and ``view_cpu_s`` in CPU
        time of its thread (what the work costs, apart from the time the thread waited for a core or the
        GIL); on the planning thread, per new view, ``plan_s`` and ``plan_cpu_s``. Counts of plans come
        from the planning thread: after ``settled`` they include every view handed over."""
        return {**self.counts, "mode": self.mode, "queue": self._queue.summary(),
                "view_s": self._view_s.summary(), "view_cpu_s": self._view_cpu_s.summary(),
                "plan_s": self._plan_s.summary(), "plan_cpu_s": self._plan_cpu_s.summary(),
                "coarse": dict(self._coarse_counts)}

    def reset_stats(self) -> None:
        self._queue = Distribution()
        self._view_s = Distribution()
        self._view_cpu_s = Distribution()
        self._plan_s = Distribution()
        self._plan_cpu_s = Distribution()
        self.counts = dict.fromkeys(self.counts, 0)
        self._coarse_counts = dict.fromkeys(COUNTS, 0)

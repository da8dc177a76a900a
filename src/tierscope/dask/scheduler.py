"""The scheduler plugin: knows where each session is in block space, places loads, dispatches prefetch.

From every ``update_graph`` it picks out tierscope's block-load tasks (``BlockLoadTask``; their keys are
``(name, *block_index)``), and for each (client, dataset, variable, tol) it:
- pins each load to the block's owner worker — rendezvous hashing of the block's *spatial* index over the
  current workers, so a time scrub stays on one worker and few blocks move when workers come and go — as
  a loose restriction (the load still runs elsewhere if the owner is gone);
- feeds the view to a ``tierscope.prefetch.Position`` and, when the view is new, plans the blocks to load
  next within the radius that fits the workers' L1 (decoded) and L2 (encoded) tiers;
- sends every worker its share of the plan (a stream message, no round trip) with a new epoch; an empty
  share still tells the worker the new position, so its queued remainder of older plans is cancelled;
- for a dataset with levels, plans the coarser levels around the same view too (``tierscope.dask.coarse``),
  each as its own position, within a share of the tiers.
Runs on the scheduler's event loop: everything here is bounded (``max_plan`` blocks per view, and
``max_coarse`` for all coarse levels together).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.serialize import ToPickle

from tierscope import config
from tierscope._compat import keep_from_stealing, set_stream_handler
from tierscope.cache import entry_charge
from tierscope.config import tier_bytes
from tierscope.dask.coarse import L1_SHARE, L2_SHARE, CoarsePlanner
from tierscope.dask.graph import BlockLoadTask, ReportedBlockLoadTask
from tierscope.dask.observe import install
from tierscope.dask.prefetcher import Plan
from tierscope.dask.tiers import PLUGIN_NAME
from tierscope.grid import BlockIndex
from tierscope.prefetch import Box, Position, check_mode, radius_for
from tierscope.protocol import PLAN_OP, VIEW_OP, BlockSpec
from tierscope.server.stats import Distribution

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = ["SCHEDULER_PLUGIN_NAME", "TierscopeSchedulerPlugin", "owner_of"]

logger = logging.getLogger(__name__)

SCHEDULER_PLUGIN_NAME = "tierscope-prefetch"
MAX_OWNERS = 1 << 16  # remembered owners (dataset, spatial index) for the current workers


def owner_of(spec: BlockSpec, index: BlockIndex, workers: Sequence[str]) -> str:
    """The block's owner: highest random weight over ``workers`` of its dataset and spatial index."""
    spatial = tuple(i for axis, i in enumerate(index) if axis != spec.time_axis)
    block = f"{spec.source.url}|{spatial}".encode()

    def weight(worker: str) -> bytes:
        return hashlib.blake2b(block + b"|" + worker.encode(), digest_size=8).digest()

    return max(workers, key=weight)


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
    ) -> None:
        self.mode = check_mode(config.get("prefetch") if prefetch is None else prefetch)
        # Workers known to run the tierscope worker plugin (``connect`` registered it there); others
        # prove it by their heartbeat's tierscope metrics. Only those get plans: a worker without the
        # handler would drop its connection to the scheduler on an unknown stream op.
        self._equipped = set(equipped)
        self._install_workers = install_workers  # a preloaded plugin brings its worker twin itself
        self._workers: list[str] = []
        self._owners: dict[tuple, str] = {}
        # Tier sizes the workers were given (bytes or fractions of memory; None: dask.config's), for
        # workers whose heartbeat has not yet said their tiers' capacity.
        self.l1 = config.get("l1") if l1 is None else l1
        self.l2 = config.get("l2") if l2 is None else l2
        self.max_plan, self.max_positions = max_plan, max_positions
        self.scheduler: Scheduler | None = None
        self._positions: OrderedDict[tuple[str, BlockSpec], Position] = OrderedDict()
        self._coarse = CoarsePlanner(max_coarse)
        self._submitted: dict[Any, float] = {}
        self._queue = Distribution()
        self._view_s = Distribution()  # the plugin's own work per new view, on the scheduler's loop
        self._view_cpu_s = Distribution()  # the same in CPU time of the loop's thread: work, not waits
        self.epoch = 0
        self.counts = {"views": 0, "loads": 0, "plans": 0, "planned": 0}

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        # Stays when this plugin goes: a client's view message must never meet a missing handler (the
        # scheduler would close that client's stream); it reaches whichever tierscope plugin is current.
        set_stream_handler(scheduler, VIEW_OP, functools.partial(_forward_view, scheduler))
        install(scheduler)  # the /tierscope page and the /metrics series
        if self._install_workers:  # every current and future worker, unless a client already did
            from distributed.protocol.pickle import dumps

            from tierscope.dask.plugin import TierscopeWorkerPlugin

            await scheduler.register_worker_plugin(None, dumps(TierscopeWorkerPlugin()), name=PLUGIN_NAME,
                                                   idempotent=True)

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
        workers = self._current(sorted(scheduler.workers))
        for spec, loads in views.items():
            for ts, index in loads:
                if workers:
                    ts.worker_restrictions = {self._owner(spec, index, workers)}
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
            lo, hi = (tuple(int(i) for i in corner) for corner in msg["box"])
            self._on_view(self.scheduler, client, spec, Box(lo, hi),
                          self._current(sorted(self.scheduler.workers)))
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
        """A closed notebook's positions go with it."""
        for key in [k for k in self._positions if k[0] == client]:
            del self._positions[key]
        self._coarse.forget_client(client)

    def _position(self, client: str, spec: BlockSpec) -> Position:
        key = (client, spec)
        pos = self._positions.get(key)
        if pos is None:
            pos = self._positions[key] = Position(spec.grid, spec.time_axis)
            while len(self._positions) > self.max_positions:
                self._positions.popitem(last=False)
        self._positions.move_to_end(key)
        return pos

    def _on_view(
        self, scheduler: Scheduler, client: str, spec: BlockSpec, view: Box, workers: list[str]
    ) -> None:
        started, cpu_started = time.perf_counter(), time.thread_time()
        pos = self._position(client, spec)
        if not pos.observe_box(view, score=self.mode == "auto"):
            return
        self.counts["views"] += 1
        targets = [w for w in workers if self._handles_plans(scheduler, w)]
        if not targets:
            return
        blocks, r1 = self._plan(scheduler, spec, pos)
        shares: dict[str, list[tuple[BlockIndex, bool]]] = {w: [] for w in workers}
        for index, near in zip(blocks, pos.within(blocks, r1), strict=True):
            shares[self._owner(spec, index, workers)].append((index, near))
        self._send(scheduler, targets, client, spec, view, shares)
        self._coarse.forget(client, spec)  # a coarse plan for this level's position was just replaced
        if self.mode != "off" and spec.levels > spec.level + 1:
            decoded, encoded = self._block_nbytes(scheduler, spec)
            for level in self._coarse.plan(
                client, spec, view, self._capacities(scheduler, "l1"), self._capacities(scheduler, "l2"),
                encoded / decoded, lambda s, i: self._owner(s, i, workers),
            ):
                self._send(scheduler, targets, client, level.spec, level.box, level.shares)
        self._view_s.add(time.perf_counter() - started)
        self._view_cpu_s.add(time.thread_time() - cpu_started)

    def _send(
        self, scheduler: Scheduler, targets: list[str], client: str, spec: BlockSpec, view: Box,
        shares: dict[str, list[tuple[BlockIndex, bool]]],
    ) -> None:
        """One plan for one position: every target worker its share (maybe empty) under a new epoch."""
        self.epoch += 1
        for worker in targets:
            share = shares.get(worker, ())
            plan = Plan(
                epoch=self.epoch, session=client, spec=spec, view=(view.lo, view.hi),
                blocks=tuple(i for i, _ in share), decode=tuple(d for _, d in share),
            )
            scheduler.worker_send(worker, {"op": PLAN_OP, "plan": ToPickle(plan)})

    def _current(self, workers: list[str]) -> list[str]:
        """The sorted worker addresses; remembered owners are forgotten when they change."""
        if workers != self._workers:
            self._workers, self._owners = workers, {}
        return workers

    def _owner(self, spec: BlockSpec, index: BlockIndex, workers: list[str]) -> str:
        """``owner_of``, remembered per (dataset, spatial index): a plan's blocks share few spatial
        indices (a time scrub none new), and each hash costs one digest per worker."""
        t = spec.time_axis
        key = (spec.source.url, index if t is None else index[:t] + index[t + 1:])
        owner = self._owners.get(key)
        if owner is None:
            if len(self._owners) >= MAX_OWNERS:
                self._owners.clear()
            owner = self._owners[key] = owner_of(spec, index, workers)
        return owner

    def _plan(
        self, scheduler: Scheduler, spec: BlockSpec, pos: Position
    ) -> tuple[list[BlockIndex], int]:
        """The blocks to prefetch for a new view, and the L1 radius (blocks within it get decoded).

        With coarser levels to plan too, the view's own level keeps what their shares leave."""
        if self.mode == "off":
            return [], 0
        decoded, encoded = self._block_nbytes(scheduler, spec)
        extents = pos.box.extents
        coarse = spec.levels > spec.level + 1
        l1 = sum(self._capacities(scheduler, "l1").values()) * (1 - L1_SHARE if coarse else 1)
        l2 = sum(self._capacities(scheduler, "l2").values()) * (1 - L2_SHARE if coarse else 1)
        r1 = radius_for(spec.grid, int(l1), decoded, spec.time_axis, view=extents)
        r2 = radius_for(spec.grid, int(l2), encoded, spec.time_axis, view=extents)
        blocks = pos.plan(self.mode, max(r1, r2), limit=self.max_plan)
        self.counts["plans"] += 1
        self.counts["planned"] += len(blocks)
        return blocks, r1

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
        new view: ``view_s`` in wall time on the scheduler's loop, ``view_cpu_s`` in CPU time of its thread
        (what the work costs, apart from the time the thread waited for a core or the GIL)."""
        return {**self.counts, "mode": self.mode, "queue": self._queue.summary(),
                "view_s": self._view_s.summary(), "view_cpu_s": self._view_cpu_s.summary(),
                "coarse": dict(self._coarse.counts)}

    def reset_stats(self) -> None:
        self._queue = Distribution()
        self._view_s = Distribution()
        self._view_cpu_s = Distribution()
        self.counts = dict.fromkeys(self.counts, 0)
        self._coarse.reset_stats()


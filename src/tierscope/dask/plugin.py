"""The worker plugin that owns a Dask worker's L1/L2 tiers and its background prefetcher.

The tiers are unmanaged memory to distributed (it cannot evict them): size ``l1 + l2`` inside the
worker's memory limit, below its spill threshold. Prefetch plans from the scheduler plugin arrive as
stream messages (op ``tierscope-prefetch``); the handler only queues them. The tier counters ride each
heartbeat (``worker.metrics["tierscope"]``, read by the scheduler plugin to size its radius) and are on the
worker's Prometheus ``/metrics`` as ``tierscope_*``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import WorkerPlugin
from distributed.protocol.serialize import Serialize

from tierscope import config
from tierscope._compat import set_handler, set_stream_handler, unset_handler
from tierscope.config import tier_bytes
from tierscope.dask.prefetcher import Plan, Prefetcher
from tierscope.dask.tiers import PLUGIN_NAME, WorkerTiers
from tierscope.errors import ReadCancelledError
from tierscope.protocol import CANCEL_OP, PLAN_OP, READ_OP, BlockSpec

if TYPE_CHECKING:
    from distributed import Worker

__all__ = ["TierscopeWorkerPlugin", "worker_stats"]

logger = logging.getLogger(__name__)

LOOP_COPY_BYTES = 1 << 20  # direct-read answers up to this size are copied on the worker's event loop
MAX_CANCELLED = 1024  # cancelled read ids remembered (a cancel may overtake its read)


class TierscopeWorkerPlugin(WorkerPlugin):
    """Holds ``tiers``; block-load tasks find it as ``get_worker().plugins["tierscope"]``."""

    name = PLUGIN_NAME
    idempotent = False  # registering again replaces the tiers (new sizes, empty caches)

    def __init__(
        self,
        l1: int | float | str | None = None,
        l2: int | float | str | None = None,
        policy: str | None = None,
        device: str | None = None,
    ) -> None:
        """Sizes in bytes or as fractions of the worker's memory limit; None: the worker's dask.config."""
        self.l1, self.l2, self.policy, self.device = l1, l2, policy, device
        self.tiers: WorkerTiers | None = None
        self.prefetcher: Prefetcher | None = None
        self._reads: dict[str, threading.Event] = {}  # direct reads loading now, by id: their stop signals
        self._cancelled: OrderedDict[str, None] = OrderedDict()  # ids cancelled lately (maybe before they came)

    def setup(self, worker: Worker) -> None:
        limit = worker.memory_manager.memory_limit
        l1 = tier_bytes(config.get("l1") if self.l1 is None else self.l1, limit, "l1")
        l2 = tier_bytes(config.get("l2") if self.l2 is None else self.l2, limit, "l2")
        policy = config.get("policy") if self.policy is None else self.policy
        device = config.get("device") if self.device is None else self.device
        self.tiers = WorkerTiers(l1, l2, policy, device)  # "auto": this worker's GPU
        self.prefetcher = Prefetcher(self.tiers)
        if limit and l1 + l2 > 0.6 * limit:
            logger.warning(
                "tierscope tiers (l1 %d + l2 %d bytes) exceed 60%% of worker %s's memory limit (%d bytes): "
                "the worker may spill or pause", l1, l2, worker.address, limit,
            )
        set_stream_handler(worker, PLAN_OP, self._on_plan)
        set_handler(worker, READ_OP, self._on_read)
        set_handler(worker, CANCEL_OP, self._on_cancel)
        worker.metrics["tierscope"] = lambda w: self._summary()
        _process_collector().plugins[worker.address] = self

    def teardown(self, worker: Worker) -> None:
        # Stays when this plugin goes: a plan already on its way must meet a handler, or the worker
        # would close its connection to the scheduler; the scheduler stops sending at the next heartbeat.
        set_stream_handler(worker, PLAN_OP, _drop_plan)
        unset_handler(worker, READ_OP)
        unset_handler(worker, CANCEL_OP)
        worker.metrics.pop("tierscope", None)
        _process_collector().plugins.pop(worker.address, None)
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.tiers is not None:
            self.tiers.close()
        self.tiers = self.prefetcher = None

    def _on_plan(self, plan: Plan) -> None:
        if self.prefetcher is not None:
            self.prefetcher.submit(plan)

    async def _on_read(
        self, spec: BlockSpec, parts: list, load: bool = False, session: str | None = None,
        view: list | None = None, read: str | None = None, copies: bool = False,
    ) -> dict[str, list[Serialize] | None]:
        """A direct read (``tierscope.dask.direct``): ``{"parts": [...]}``, the blocks this worker lacks
        fetched in one batch and every block decoded in parallel (``WorkerTiers.read_loading``); without
        ``load`` (the client's ``tierscope.direct-read.load``), only when every block is in L1 or L2; with
        ``copies`` (``direct.copies_only``), only when every one is in L1. ``{"parts": None}`` (nothing
        counted) leaves the view to the graph, which also meets a failed fetch's error for the user.

        Small L1 answers are copied on the event loop (microseconds); bigger ones, GPU copies, decodes and
        fetches go to a thread, so the loop keeps answering heartbeats and plans. ``session`` and ``view``
        (the box's corners) say where the reader is now: the fetches tell the server, before the scheduler's
        plan for this view arrives, so a jump drops the server's prefetch for the old position at once.
        ``view`` None: the read is no view (``direct.unreported``), and its fetch says so to the server
        (``moves=False``). ``read``: the read's id, for ``_on_cancel`` (a cancelled read answers None).
        """
        tiers = self.tiers
        if tiers is None:
            return {"parts": None}
        if load and session is not None and view is not None:
            tiers.set_view(session, spec, tuple(tuple(int(i) for i in corner) for corner in view))
        pieces = [(tuple(index), tuple(slice(a, b) for a, b in part)) for index, part in parts]
        nbytes = sum(math.prod(s.stop - s.start for s in part) for _, part in pieces) * spec.itemsize
        if nbytes <= LOOP_COPY_BYTES and tiers.device == "cpu":
            got = tiers.read_cached(spec, pieces)
        else:
            got = await asyncio.to_thread(tiers.read_cached, spec, pieces)
        if got is None:
            if (copies or not load and not tiers.held(spec, [index for index, _ in pieces])
                    or read in self._cancelled):
                return {"parts": None}
            stop = threading.Event()  # registered with no await since the check: no cancel slips between
            if read is not None:
                self._reads[read] = stop
            try:
                got = await asyncio.to_thread(tiers.read_loading, spec, pieces, stop, view is not None)
            except ReadCancelledError:
                return {"parts": None}
            except Exception as exc:  # e.g. the server is down: the graph's loads retry and report it
                logger.info("direct read of %d blocks of %r left to the graph: %r", len(pieces), spec.variable, exc)
                return {"parts": None}
            finally:
                self._reads.pop(read, None)
        return {"parts": [Serialize(values) for values in got]}

    def _on_cancel(self, read: str) -> None:
        """Stop direct read ``read``: its fetch and decodes end at the next block. On the event loop, as
        ``_on_read``, which owns ``_reads``; an id not (yet) reading is remembered, a bounded few."""
        stop = self._reads.get(read)
        if stop is not None:
            stop.set()
        self._cancelled[read] = None
        while len(self._cancelled) > MAX_CANCELLED:
            self._cancelled.popitem(last=False)

    def _summary(self) -> dict[str, Any]:
        """What the scheduler needs each heartbeat: tier occupancy (to size its radii) and the counters
        its dashboard page and ``/metrics`` show."""
        tiers, prefetcher = self.tiers, self.prefetcher
        if tiers is None or prefetcher is None:
            return {}
        return {"l1": tiers.l1.info(), "l2": tiers.l2.info(), "prefetch": prefetcher.stats()}

    def stats(self) -> dict[str, Any] | None:
        if self.tiers is None or self.prefetcher is None:
            return None
        return worker_stats(self.tiers.stats(), self.prefetcher.stats())


def _drop_plan(plan: Plan) -> None:
    """The plan handler of a worker whose tierscope plugin was removed: nothing to fill."""


def worker_stats(tiers: dict[str, Any], prefetcher: dict[str, int]) -> dict[str, Any]:
    """One worker's figures: tiers, fetches, stage times, and prefetch issued/used/wasted/cancelled.

    ``issued`` counts tier entries a prefetch inserted (a decoded prefetch inserts into L2 and L1), and
    each of them ends up ``used`` (a user load asked for it), ``wasted`` (evicted unasked) or still held.
    """
    from tierscope.client.http import retries

    l1, l2 = tiers["l1"], tiers["l2"]
    prefetch = {
        "issued": l1["prefetched"] + l2["prefetched"],
        "used": l1["prefetch_used"] + l2["prefetch_used"],
        "wasted": l1["prefetch_wasted"] + l2["prefetch_wasted"],
        "cancelled": prefetcher["cancelled"],
        "failed": prefetcher["failed"],
        "queued": prefetcher["queued"],
        "plans": prefetcher["plans"],
        "blocks": prefetcher["issued"],
        "skipped": prefetcher["skipped"],
    }
    return {**tiers, "prefetch": prefetch, "retries": retries()}


class _Collector:
    """Prometheus view of the tierscope figures of every worker in this process, labelled by worker.

    One per process, registered once in the global registry the workers' ``/metrics`` serve: a threaded
    cluster runs several workers in one process, and a collector per worker would clash by name.
    """

    def __init__(self) -> None:
        self.plugins: dict[str, TierscopeWorkerPlugin] = {}

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        lookups = CounterMetricFamily("tierscope_tier_lookups", "User lookups per tier",
                                      labels=["worker", "tier", "result"])
        held = GaugeMetricFamily("tierscope_tier_bytes", "Bytes held per tier", labels=["worker", "tier"])
        prefetch = CounterMetricFamily("tierscope_prefetch_blocks", "Prefetch outcomes",
                                       labels=["worker", "outcome"])
        stages = CounterMetricFamily("tierscope_stage_seconds", "Time per load stage",
                                     labels=["worker", "stage", "purpose"])
        fetches = CounterMetricFamily("tierscope_fetches", "Blocks fetched from the block server",
                                      labels=["worker"])
        for worker, plugin in list(self.plugins.items()):
            stats = plugin.stats()
            if stats is None:
                continue
            for tier in ("l1", "l2"):
                lookups.add_metric([worker, tier, "hit"], stats[tier]["hits"])
                lookups.add_metric([worker, tier, "miss"], stats[tier]["misses"])
                held.add_metric([worker, tier], stats[tier]["nbytes"])
            for outcome in ("issued", "used", "wasted", "cancelled", "failed"):
                prefetch.add_metric([worker, outcome], stats["prefetch"][outcome])
            for purpose, key in (("user", "stage_s"), ("prefetch", "prefetch_stage_s")):
                for stage, seconds in stats[key].items():
                    stages.add_metric([worker, stage, purpose], seconds)
            fetches.add_metric([worker], stats["fetches"])
        yield from (lookups, held, prefetch, stages, fetches)


_collector_lock = threading.Lock()
_collector: _Collector | None = None


def _process_collector() -> _Collector:
    """This process's collector, registered on first use."""
    global _collector
    with _collector_lock:
        if _collector is None:
            from prometheus_client import REGISTRY

            _collector = _Collector()
            REGISTRY.register(_collector)
        return _collector

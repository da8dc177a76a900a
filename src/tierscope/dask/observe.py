"""tierscope on the Dask scheduler's own web server: a dashboard page and Prometheus series.

Both read what is already on the scheduler — the scheduler plugin's counters and positions, and the
tierscope figures each worker's heartbeat carries (``worker.metrics["tierscope"]``) — so looking costs the
cluster nothing. The page (``/tierscope`` next to the dashboard, refreshed every 2 s) is plain HTML: the
dashboard's Bokeh is optional in distributed and absent here. The series join the scheduler's
``/metrics`` as ``tierscope_scheduler_*`` and ``tierscope_cluster_*``.
"""

from __future__ import annotations

import html
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tornado import web

from tierscope.dask.plugin import worker_stats

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = ["PAGE", "install"]

PAGE = "/tierscope"
REFRESH_S = 2
_PREFETCH = ("issued", "used", "wasted", "cancelled")


def install(scheduler: Scheduler) -> None:
    """Add the page to this scheduler's web server and the series to its process' registry, once."""
    with _lock:
        if scheduler not in _installed and getattr(scheduler, "http_application", None) is not None:
            scheduler.http_application.add_handlers(r".*", [(PAGE, TierscopePage, {"scheduler": scheduler})])
            _installed.add(scheduler)
        _collector().schedulers.add(scheduler)


def _plugin(scheduler: Scheduler) -> Any:
    from tierscope.dask.scheduler import SCHEDULER_PLUGIN_NAME

    return scheduler.plugins.get(SCHEDULER_PLUGIN_NAME)


def _workers(scheduler: Scheduler) -> dict[str, dict[str, Any]]:
    """Each worker's tierscope figures from its last heartbeat (workers without the plugin left out)."""
    out = {}
    for address, ws in scheduler.workers.items():
        summary = ws.metrics.get("tierscope") or {}
        if "prefetch" in summary:
            out[address] = worker_stats(summary, summary["prefetch"])
    return out


def _fill(tier: dict[str, Any]) -> str:
    capacity = tier.get("capacity") or 0
    share = f" ({tier['nbytes'] / capacity:.0%})" if capacity else ""
    return f"{tier['nbytes'] / 2**20:.1f} / {capacity / 2**20:.0f} MiB{share}, {tier['blocks']} blocks"


def _ratio(tier: dict[str, Any]) -> str:
    looks = tier["hits"] + tier["misses"]
    return f"{tier['hits'] / looks:.0%} of {looks}" if looks else "-"


def _table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def render(scheduler: Scheduler) -> str:
    """The page: tier fill and hit ratios per worker, prefetch outcomes, and each session's position."""
    workers = _workers(scheduler)
    worker_rows = [
        [address, _fill(s["l1"]), _ratio(s["l1"]), _fill(s["l2"]), _ratio(s["l2"]),
         *(str(s["prefetch"][k]) for k in _PREFETCH)]
        for address, s in sorted(workers.items())
    ]
    plugin = _plugin(scheduler)
    sessions = []
    if plugin is not None:
        for (client, spec), pos in list(plugin.positions.items()):
            where = f"{list(pos.box.lo)} .. {list(pos.box.hi)}"
            sessions.append([client, f"{spec.source.dataset}/{spec.variable}", f"{spec.tol:g}", where,
                             str(pos.views), pos.predictor])
    counts = plugin.stats() if plugin is not None else {}
    summary = ", ".join(f"{k} {counts[k]}" for k in ("views", "loads", "plans", "planned") if k in counts)
    return (
        f"<!doctype html><html><head><meta http-equiv='refresh' content='{REFRESH_S}'>"
        "<title>tierscope</title><style>body{font-family:sans-serif}td,th{padding:2px 8px;"
        "text-align:left}tr:nth-child(even){background:#f0f0f0}</style></head><body>"
        f"<h2>tierscope</h2><p>prefetch mode {html.escape(str(counts.get('mode', 'off')))}; "
        f"{html.escape(summary or 'no scheduler plugin')}</p>"
        "<h3>Worker tiers</h3>"
        + _table(["worker", "L1 fill", "L1 hits", "L2 fill", "L2 hits", "prefetch issued", "used",
                  "wasted", "cancelled"], worker_rows)
        + "<h3>Sessions</h3>"
        + _table(["client", "variable", "tol", "view box (blocks)", "views", "predictor"], sessions)
        + "</body></html>"
    )


class TierscopePage(web.RequestHandler):
    """``GET /tierscope`` on the scheduler's web server."""

    def initialize(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(render(self.scheduler))


class _Collector:
    """Prometheus series for the tierscope figures of the schedulers in this process."""

    def __init__(self) -> None:
        self.schedulers: weakref.WeakSet[Scheduler] = weakref.WeakSet()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        events = CounterMetricFamily("tierscope_scheduler_events", "Views, loads and plans seen by the "
                                     "tierscope scheduler plugin", labels=["event"])
        positions = GaugeMetricFamily("tierscope_scheduler_positions", "Session positions tracked")
        prefetch = CounterMetricFamily("tierscope_cluster_prefetch_blocks", "Prefetch outcomes summed over "
                                       "the workers' heartbeats", labels=["outcome"])
        held = GaugeMetricFamily("tierscope_cluster_tier_bytes", "Bytes held per tier over all workers",
                                 labels=["tier"])
        for scheduler in list(self.schedulers):
            plugin = _plugin(scheduler)
            if plugin is not None:
                counts = plugin.stats()
                for event in ("views", "loads", "plans", "planned"):
                    events.add_metric([event], counts[event])
                positions.add_metric([], len(plugin.positions))
            workers = _workers(scheduler).values()
            for outcome in _PREFETCH:
                prefetch.add_metric([outcome], sum(s["prefetch"][outcome] for s in workers))
            for tier in ("l1", "l2"):
                held.add_metric([tier], sum(s[tier]["nbytes"] for s in workers))
        yield from (events, positions, prefetch, held)


_lock = threading.Lock()
_installed: weakref.WeakSet[Scheduler] = weakref.WeakSet()
_process_collector: _Collector | None = None


def _collector() -> _Collector:
    """This process's collector, registered in the global registry the scheduler's /metrics serves."""
    global _process_collector
    if _process_collector is None:
        from prometheus_client import REGISTRY

        _process_collector = _Collector()
        REGISTRY.register(_process_collector)
    return _process_collector

"""``GET /metrics``: the service's stats in Prometheus text format.

A collector reads ``BlockService.stats()`` at scrape time (no second set of counters to keep in step),
registered in a registry of its own per app, so several servers in one process do not clash.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from tierscope.server.service import BlockService

__all__ = ["CONTENT_TYPE", "metrics_registry", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _ServiceCollector:
    def __init__(self, service: BlockService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        stats = self.service.stats()
        requests = CounterMetricFamily("tierscope_requests", "Block requests by purpose", labels=["purpose"])
        for purpose, n in stats["requests"].items():
            requests.add_metric([purpose], n)
        yield requests
        served = CounterMetricFamily("tierscope_served", "Block requests by answering tier", labels=["tier"])
        for tier, n in stats["served_by"].items():
            served.add_metric([tier], n)
        yield served
        yield CounterMetricFamily("tierscope_origin_reads", "Blocks read from an origin",
                                  value=stats["origin_reads"])
        yield CounterMetricFamily("tierscope_encodes", "Blocks encoded", value=stats["encodes"])
        prefetch = CounterMetricFamily("tierscope_prefetch", "Server prefetch work", labels=["event"])
        for event in ("planned", "issued", "cancelled", "expired", "skipped", "errors", "used",
                      "wasted"):
            prefetch.add_metric([event], stats["prefetch"][event])
        yield prefetch
        tier_events = CounterMetricFamily("tierscope_tier_events", "Tier lookups and evictions",
                                          labels=["tier", "event"])
        occupancy = GaugeMetricFamily("tierscope_tier_bytes", "Bytes held by a tier", labels=["tier"])
        capacity = GaugeMetricFamily("tierscope_tier_capacity_bytes", "Tier capacity", labels=["tier"])
        for tier, info in stats["tiers"].items():
            for event in ("hits", "misses", "evictions", "waits", "prefetched", "prefetch_used",
                          "prefetch_wasted"):
                tier_events.add_metric([tier, event], info[event])
            occupancy.add_metric([tier], info["nbytes"])
            capacity.add_metric([tier], info["capacity"])
        yield from (tier_events, occupancy, capacity)
        for field, help_text in (("count", "Samples"), ("mean_ms", "Mean (ms)"), ("p50_ms", "Median (ms)"),
                                 ("p95_ms", "95th percentile (ms)"), ("max_ms", "Maximum (ms)")):
            stage = GaugeMetricFamily(f"tierscope_stage_{field}", f"{help_text} of a server stage",
                                      labels=["stage"])
            for name, summary in stats["stages"].items():
                stage.add_metric([name], summary[field])
            yield stage


def metrics_registry(service: BlockService) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ServiceCollector(service))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)

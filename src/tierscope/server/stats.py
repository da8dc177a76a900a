"""The block server's counters and stage-time distributions (``GET /stats``, ``GET /metrics``).

Only the service's event loop writes them, so they need no lock. Percentiles are over a window of the
most recent samples (bounded memory); counts, means and maxima are over everything since the last reset.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

__all__ = ["STAGES", "TIERS", "Distribution", "ServerStats"]

STAGES = ("read", "encode", "queue")  # origin read, encode, wait for an executor thread
TIERS = ("l3", "l4", "origin")
WINDOW = 4096


class Distribution:
    """Durations of one stage, in seconds; summarised in milliseconds."""

    def __init__(self, window: int = WINDOW) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self._recent: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)
        self._recent.append(seconds)

    def summary(self) -> dict[str, float]:
        """count, mean and max since the last reset; p50/p95/p99 (nearest rank) of the recent window."""
        mean = self.total / self.count if self.count else 0.0
        ordered = sorted(self._recent)

        def quantile(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

        return {
            "count": self.count,
            "mean_ms": mean * 1e3,
            "p50_ms": quantile(0.5) * 1e3,
            "p95_ms": quantile(0.95) * 1e3,
            "p99_ms": quantile(0.99) * 1e3,
            "max_ms": self.max * 1e3,
        }


class ServerStats:
    """Requests by purpose, answers by tier, origin reads, encodes, prefetch work, stage times."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()  # by purpose; a batch counts one per block
        self.batches = 0
        self.served_by: Counter[str] = Counter()  # which tier answered each block request
        self.origin_reads = 0  # actual reads from an origin (one per load, however many waited)
        self.encodes = 0
        self.raw_sent = 0  # user blocks answered raw because that reached the client sooner (adapt)
        self.prefetch: Counter[str] = Counter()  # planned, issued, cancelled, skipped, errors
        self.stages = {stage: Distribution() for stage in STAGES}

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": {p: self.requests[p] for p in ("user", "prefetch")},
            "batches": self.batches,
            "served_by": {t: self.served_by[t] for t in TIERS},
            "origin_reads": self.origin_reads,
            "encodes": self.encodes,
            "raw_sent": self.raw_sent,
            "prefetch": {k: self.prefetch[k] for k in ("planned", "issued", "cancelled", "skipped",
                                                       "errors")},
            "stages": {stage: d.summary() for stage, d in self.stages.items()},
        }

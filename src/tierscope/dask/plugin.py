"""The worker plugin that owns a Dask worker's L1/L2 tiers.

The tiers are unmanaged memory to distributed (it cannot evict them): size ``l1 + l2`` inside the
worker's memory limit, below its spill threshold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distributed.diagnostics.plugin import WorkerPlugin

from tierscope.dask.tiers import PLUGIN_NAME, WorkerTiers

if TYPE_CHECKING:
    from distributed import Worker

__all__ = ["TierscopeWorkerPlugin"]


class TierscopeWorkerPlugin(WorkerPlugin):
    """Holds ``tiers``; block-load tasks find it as ``get_worker().plugins["tierscope"]``."""

    name = PLUGIN_NAME
    idempotent = False  # registering again replaces the tiers (new sizes, empty caches)

    def __init__(self, l1: int, l2: int) -> None:
        self.l1, self.l2 = int(l1), int(l2)
        self.tiers: WorkerTiers | None = None

    def setup(self, worker: Worker) -> None:
        self.tiers = WorkerTiers(self.l1, self.l2)

    def teardown(self, worker: Worker) -> None:
        self.tiers = None

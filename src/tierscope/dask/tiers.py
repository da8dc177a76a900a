"""Worker-side tiers: L1 holds decoded blocks, L2 encoded frames; a miss in both asks block service.

Each process has one ``WorkerTiers``: the tierscope worker plugin's on a Dask worker, a process-local one
elsewhere (dask's local schedulers, or no dask at all). Loads are single-flight per block key in each tier.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from tierscope import codec
from tierscope.cache import TierCache
from tierscope.client.source import Source
from tierscope.grid import BlockIndex

__all__ = ["BlockSpec", "WorkerTiers", "configure_local_tiers", "current_tiers", "local_tiers"]

PLUGIN_NAME = "tierscope"
DEFAULT_L1 = 1 << 30
DEFAULT_L2 = 2 << 30


@dataclass(frozen=True)
class BlockSpec:
    """Which blocks a load task reads: a dataset's variable at one error bound ``tol``."""

    source: Source
    variable: str
    tol: float

    def block_key(self, index: BlockIndex) -> Hashable:
        """The brief's block key (dataset, variable, tol, block index), the dataset named by its URL."""
        return (self.source.url, self.variable, self.tol, tuple(index))


class WorkerTiers:
    """L1 (decoded) over L2 (encoded) over the transport, with fetch and stage-time counters."""

    def __init__(self, l1: int, l2: int) -> None:
        self.l1: TierCache[np.ndarray] = TierCache(l1, "l1")
        self.l2: TierCache[bytes] = TierCache(l2, "l2")
        self._lock = threading.Lock()
        self.fetches = 0
        self.network_s = 0.0
        self.decode_s = 0.0

    def load(self, spec: BlockSpec, index: BlockIndex) -> np.ndarray:
        """One decoded block, as a private copy (a cached block is never handed out)."""
        key = spec.block_key(index)
        return self.l1.get_or_load(key, lambda: self._decode(spec, index, key)).copy()

    def _decode(self, spec: BlockSpec, index: BlockIndex, key: Hashable) -> np.ndarray:
        frame = self.l2.get_or_load(key, lambda: self._fetch(spec, index))
        t0 = time.perf_counter()
        block = codec.decode(frame)
        block.flags.writeable = False
        with self._lock:
            self.decode_s += time.perf_counter() - t0
        return block

    def _fetch(self, spec: BlockSpec, index: BlockIndex) -> bytes:
        t0 = time.perf_counter()
        frame = spec.source.transport().fetch(
            spec.source.dataset, spec.variable, index, spec.tol, purpose="user"
        )
        with self._lock:
            self.fetches += 1
            self.network_s += time.perf_counter() - t0
        return frame

    def stats(self) -> dict[str, object]:
        with self._lock:
            fetches, network_s, decode_s = self.fetches, self.network_s, self.decode_s
        return {
            "l1": self.l1.info(),
            "l2": self.l2.info(),
            "fetches": fetches,
            "stage_s": {"fetch": network_s, "decode": decode_s},
        }


_local_lock = threading.Lock()
_local: WorkerTiers | None = None


def configure_local_tiers(l1: int, l2: int) -> WorkerTiers:
    """Replace this process's tiers (used when no Dask worker plugin owns them)."""
    global _local
    with _local_lock:
        _local = WorkerTiers(l1, l2)
        return _local


def local_tiers() -> WorkerTiers:
    global _local
    with _local_lock:
        if _local is None:
            _local = WorkerTiers(DEFAULT_L1, DEFAULT_L2)
        return _local


def current_tiers() -> WorkerTiers:
    """The tiers of the running Dask worker's plugin, else this process's own."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return local_tiers()
    plugin = worker.plugins.get(PLUGIN_NAME)
    return plugin.tiers if plugin is not None else local_tiers()

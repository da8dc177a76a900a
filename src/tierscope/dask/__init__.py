"""Dask integration: worker tiers, the block-load graph, the worker plugin, connect/stats."""

from tierscope.dask.connect import connect, stats
from tierscope.dask.graph import block_array, load_block
from tierscope.dask.tiers import BlockSpec, WorkerTiers

__all__ = ["BlockSpec", "WorkerTiers", "block_array", "connect", "load_block", "stats"]

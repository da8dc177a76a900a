"""What the client, the block server and the Dask layer share: value types and protocol names.

A neutral module, so each layer imports it instead of another layer: the HTTP client does not import
the server, and the codec imports neither. docs/protocol.md describes the wire format these names make.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tierscope.grid import BlockGrid, BlockIndex

if TYPE_CHECKING:
    from tierscope.client.source import Source

__all__ = [
    "CANCEL_OP", "ENCODE_MS_HEADER", "LINK_HEADER", "MAX_BATCH", "MAX_INDEX_LEN",
    "MAX_POSITION_BLOCKS", "MOVES_HEADER", "PLAN_OP", "POSITION_HEADER", "READ_MS_HEADER", "READ_OP",
    "SESSION_HEADER", "TIER_HEADER", "VIEW_OP", "BlockSpec", "parse_block_index",
]

# Block server HTTP (docs/protocol.md)
MAX_BATCH = 256  # block indices in one batch request
# A position header lists blocks whose box is the view (clients send its two corners): a few suffice,
# and a short list keeps every request's cost on the server's loop small.
MAX_POSITION_BLOCKS = 64
MAX_INDEX_LEN = 32  # axes of a block index
SESSION_HEADER = "X-Tierscope-Session"
POSITION_HEADER = "X-Tierscope-Position"
TIER_HEADER = "X-Tierscope-Tier"
READ_MS_HEADER = "X-Tierscope-Read-Ms"
ENCODE_MS_HEADER = "X-Tierscope-Encode-Ms"
LINK_HEADER = "X-Tierscope-Link"  # client -> server: the link throughput the client measured, bytes/s
# client -> server: "no" for a user request that is not a view of its own (a progressive view's coarse
# part): it moves no position and plans no prefetch. Absent (older clients) or "yes": it does.
MOVES_HEADER = "X-Tierscope-Moves"


def parse_block_index(text: str, what: str = "block index") -> tuple[int, ...]:
    """Parse ``"3.0.1.2"`` into a block index (non-negative ints, bounded length)."""
    parts = text.split(".")
    if not text or len(parts) > MAX_INDEX_LEN or not all(
        p.isascii() and p.isdigit() and len(p) < 10 for p in parts
    ):
        raise ValueError(f"malformed {what} {text[:80]!r}: expected dot-separated integers like 0.3.1.2")
    return tuple(int(p) for p in parts)


# Dask messages between the plugins and the client
PLAN_OP = "tierscope-prefetch"  # scheduler -> worker stream message carrying a prefetch Plan
VIEW_OP = "tierscope-view"  # client -> scheduler stream message reporting a view read directly
READ_OP = "tierscope_read"  # the worker handler that answers a direct read
CANCEL_OP = "tierscope_cancel"  # the worker handler that stops a direct read (by its id)


@dataclass(frozen=True)
class BlockSpec:
    """Which blocks a load task reads: a dataset's variable at one error bound ``tol``.

    The grid and time axis ride along so the scheduler plugin can place and plan without asking anyone;
    so does where the spec sits in the dataset's levels (``tierscope.levels``): ``level`` (0 = full
    resolution; the source then names ``NAME@level``), how many ``levels`` the dataset has, and
    ``level_axes``, the axes levels coarsen, so the plugin can derive any coarser level's grid and plan it
    too (``tierscope.dask.coarse``). The defaults describe a dataset without levels.
    """

    source: Source
    variable: str
    tol: float
    grid: BlockGrid
    dtype: str  # numpy dtype string of the raw values (sizes a decoded block)
    time_axis: int | None = 0
    level: int = 0
    levels: int = 1
    level_axes: tuple[int, ...] = ()

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def coarsest(self) -> bool:
        """Whether this is the coarsest level of a dataset with levels: a progressive view's first part."""
        return self.levels > 1 and self.level == self.levels - 1

    @property
    def block_nbytes(self) -> int:
        """Bytes of one decoded (full) block."""
        return math.prod(self.grid.block) * self.itemsize

    def block_key(self, index: BlockIndex) -> Hashable:
        """The brief's block key (dataset, variable, tol, block index), the dataset named by its URL and
        store version (``Source.cache_id``), so a rewritten store never hits its old contents' blocks."""
        return (self.source.cache_id, self.variable, self.tol, tuple(index))

"""The embedded transport: a block service inside this process, over a local store.

Each process that loads blocks (the notebook, each Dask worker process) opens its own service on the same
store, so a LocalCluster with worker processes needs no server at all. The service runs on the process's
I/O loop (``tierscope._sync``), the loop that owns its state; callers' threads wait on it. Its L3/L4 stay
off: the worker tiers above already hold this process's blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tierscope import _sync
from tierscope.client.source import Fetched, Transport
from tierscope.grid import BlockIndex
from tierscope.metadata import DatasetInfo
from tierscope.protocol import MAX_BATCH
from tierscope.server.service import BlockResult, BlockService
from tierscope.store.origin import Origin, ZarrOrigin, open_origin

__all__ = ["EmbeddedTransport"]


def _fetched(result: BlockResult) -> Fetched:
    return Fetched(result.frame, result.tier, result.read_s + result.encode_s)


def _open(location: str, storage_options: Mapping[str, Any] | None) -> Origin:
    """The store's origin; fsspec options can only be meant for a zarr store URL."""
    if storage_options is None:
        return open_origin(location)
    return ZarrOrigin(location, storage_options=storage_options)


class EmbeddedTransport(Transport):
    def __init__(self, location: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.service = BlockService([_open(location, storage_options)])
        _sync.sync(self.service.start())

    def info(self, dataset: str) -> DatasetInfo:
        return self.service.info(dataset)

    def fetch(
        self,
        dataset: str,
        variable: str,
        index: BlockIndex,
        tol: float,
        purpose: str = "user",
        session: str | None = None,
        position: Sequence[BlockIndex] | None = None,
        *,
        moves: bool = True,
    ) -> Fetched:
        result = _sync.sync(self.service.block(dataset, variable, index, tol=tol, purpose=purpose,
                                               session=session, position=position, moves=moves))
        return _fetched(result)

    def fetch_many(
        self,
        dataset: str,
        variable: str,
        indices: Sequence[BlockIndex],
        tol: float,
        purpose: str = "user",
        session: str | None = None,
        position: Sequence[BlockIndex] | None = None,
        *,
        moves: bool = True,
    ) -> list[Fetched]:
        indices = list(indices)
        frames = []
        for start in range(0, len(indices), MAX_BATCH):
            results = _sync.sync(self.service.batch(
                dataset, variable, indices[start:start + MAX_BATCH], tol=tol, purpose=purpose,
                session=session, position=position, moves=moves,
            ))
            frames.extend(_fetched(r) for r in results)
        return frames

    def server_stats(self) -> dict[str, object]:
        return self.service.stats()

    def codec(self) -> str:
        return self.service.codec_name

    def close(self) -> None:
        _sync.sync(self.service.aclose(), timeout=30)
        self.service.close()

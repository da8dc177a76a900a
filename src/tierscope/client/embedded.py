"""The embedded transport: a block service inside this process, over a local store.

Each process that loads blocks (the notebook, each Dask worker process) opens its own service on the same
store, so a LocalCluster with worker processes needs no server at all.
"""

from __future__ import annotations

from tierscope.client.source import Transport
from tierscope.grid import BlockIndex
from tierscope.metadata import DatasetInfo
from tierscope.server.service import BlockService
from tierscope.store.origin import open_origin

__all__ = ["EmbeddedTransport"]


class EmbeddedTransport(Transport):
    def __init__(self, path: str) -> None:
        self.service = BlockService([open_origin(path)])

    def info(self, dataset: str) -> DatasetInfo:
        return self.service.info(dataset)

    def fetch(
        self, dataset: str, variable: str, index: BlockIndex, tol: float, purpose: str = "user"
    ) -> bytes:
        return self.service.block(dataset, variable, index, tol=tol, purpose=purpose).frame

    def server_stats(self) -> dict[str, object]:
        return self.service.stats()

    def close(self) -> None:
        self.service.close()

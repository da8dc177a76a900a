"""Block-load tasks that reach the scheduler as ``(name, *block_index)``, one per whole block.

dask's default array optimisation fuses a load task into the slicing task after it and renames it, which
would hide the block being read from the scheduler (and from tierscope's scheduler plugin). The tasks here
refuse fusion (``block_fusion``), and the layer builds tasks only for the blocks a computation needs, so
a variable with millions of blocks costs nothing until it is sliced.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from tierscope._compat import Layer, MaterializedLayer, Task

from tierscope.dask.tiers import BlockSpec, current_tiers
from tierscope.grid import BlockIndex

__all__ = [
    "BlockLayer", "BlockLoadTask", "ReportedBlockLoadTask", "block_array", "block_array_name", "load_block",
]


def load_block(spec: BlockSpec, index: BlockIndex) -> np.ndarray:
    """The function every block-load task runs: through this process's tiers."""
    return current_tiers().load(spec, index)


class BlockLoadTask(Task):
    """A load of one whole block; never fused with the tasks that slice it."""

    __slots__ = ()

    @property
    def block_fusion(self) -> bool:
        return True


class ReportedBlockLoadTask(BlockLoadTask):
    """A block load whose view the client already told the scheduler plugin (a direct read's remainder):
    placed like any load, but not taken for the view itself."""

    __slots__ = ()


class BlockLayer(Layer):
    """All block-load tasks of one variable, materialised only for the keys a graph needs."""

    def __init__(self, name: str, spec: BlockSpec, reported: bool = False) -> None:
        super().__init__()
        self.name, self.spec, self.grid = name, spec, spec.grid
        self.task_type = ReportedBlockLoadTask if reported else BlockLoadTask

    def is_materialized(self) -> bool:
        return False

    @property
    def has_legacy_tasks(self) -> bool:
        """Never: every task is a ``BlockLoadTask`` (dask's default check would build them all)."""
        return False

    def get_output_keys(self) -> set[tuple]:
        return set(self)

    def _task(self, key: tuple) -> BlockLoadTask:
        return self.task_type(key, load_block, self.spec, tuple(key[1:]))

    def _owns(self, key: object) -> bool:
        return isinstance(key, tuple) and len(key) == self.grid.ndim + 1 and key[0] == self.name

    def __getitem__(self, key: tuple) -> BlockLoadTask:
        if not self._owns(key):
            raise KeyError(key)
        self.grid.check(key[1:])
        return self._task(key)

    def __iter__(self) -> Iterator[tuple]:
        return ((self.name, *index) for index in self.grid.indices())

    def __len__(self) -> int:
        return math.prod(self.grid.nblocks)

    def __contains__(self, key: object) -> bool:
        if not self._owns(key):
            return False
        return all(0 <= i < n for i, n in zip(key[1:], self.grid.nblocks, strict=True))

    def cull(self, keys: set, all_hlg_keys: object) -> tuple[Layer, dict]:
        mine = {key: self._task(key) for key in keys if key in self}
        return MaterializedLayer(mine), {key: set() for key in mine}


def block_array_name(spec: BlockSpec, dtype: np.dtype) -> str:
    """Deterministic: the same dataset, variable and tol always give the same task keys."""
    return f"tierscope-{spec.variable}-{tokenize(spec, np.dtype(dtype).str)}"


def block_array(spec: BlockSpec, dtype: np.dtype, reported: bool = False):  # noqa: ANN201 - dask.array.Array
    """A dask array whose chunks are the stored blocks and whose tasks are block loads.

    ``reported``: the view these loads belong to was already told to the scheduler plugin.
    """
    import dask.array as da

    name = block_array_name(spec, dtype)
    graph = HighLevelGraph({name: BlockLayer(name, spec, reported)}, {name: set()})
    meta = np.empty((0,) * spec.grid.ndim, dtype=dtype)
    return da.Array(graph, name, spec.grid.chunks, dtype=dtype, meta=meta)

"""The coarse levels of a ``sample://`` dataset, computed on read like its level 0.

Level 0 repeats a tile of ``P = min(n, period)`` points along each spatial axis, so a window of level
``k`` (``w = 2**k`` points starting at ``j * w``) holds values that depend only on where it starts in the
tile, ``j * w mod P``, and on its length (shorter only at the far edge). Those *window classes* repeat
every ``P / gcd(P, w)`` coarse points; a level's values are one small *coarse tile* of the classes, and
a block is that tile indexed by class, as a level-0 block is the tile indexed periodically. Each coarse
tile is computed once per (variable, step, level) from level 0's tile and kept in the origin's tile cache:

- exactly, when the windows of the classes, gathered from the tile, hold at most ``GATHER_LIMIT`` points:
  the gathered windows are coarsened by the rule's kernel, so every value is what ``xarray``'s coarsen of
  the whole level 0 gives, bit for bit. When ``w`` divides the period (the default period 128 and any
  ``k <= 7``) that is one tile's worth of points, and a coarse block costs about what a level-0 block
  does; when it does not, up to ``lcm(P, w) / P`` tiles' worth along each axis;
- otherwise (windows much longer than the period, or a period that ``w`` divides badly): as weighted
  sums over the tile in float64, each tile point counted as often as its window holds it; the same mean
  up to float rounding, at the cost of a few passes over the tile.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from tierscope.grid import BlockIndex
from tierscope.levels import coarsen_block, level_info, windows
from tierscope.metadata import DatasetInfo
from tierscope.store.origin import Origin

if TYPE_CHECKING:
    from tierscope.store.synthetic import SyntheticOrigin

__all__ = ["GATHER_LIMIT", "SyntheticLevel"]

GATHER_LIMIT = 2**24
"""Most level-0 points gathered to compute one coarse tile exactly (64 MiB of float32)."""


class _Axis:
    """One spatial axis of a level: the class of each coarse point, and each class's window as level-0
    tile indices (-1: past the far edge, where the window is short)."""

    def __init__(self, n: int, period: int, w: int) -> None:
        full = n // w
        repeat = period // math.gcd(period, w)
        classes = min(repeat, full)
        self.ids = np.arange(-(-n // w)) % repeat
        starts, lengths = [c * w for c in range(classes)], [w] * classes
        if n % w:
            self.ids[-1] = classes
            starts.append(full * w)
            lengths.append(n - full * w)
        self.window = w
        self.index = np.full((len(starts), w), -1, dtype=np.intp)
        for c, (start, length) in enumerate(zip(starts, lengths, strict=True)):
            self.index[c, :length] = (start + np.arange(length)) % period

    @property
    def gathered(self) -> int:
        return self.index.size


class SyntheticLevel(Origin):
    """Level ``k >= 1`` of a synthetic dataset (``SyntheticOrigin.level(k)``)."""

    def __init__(self, base: SyntheticOrigin, k: int, name: str) -> None:
        self._locate(base.location, name, None)
        self._base, self.k = base, k
        self._info = level_info(base.info(), k, name)
        var = next(iter(base.info().variables.values()))
        axes = windows(var.dims, var.shape, var.dims[1:], k)
        self._axes = [_Axis(n, p, axes.get(a + 1, 1))
                      for a, (n, p) in enumerate(zip(base.shape[1:], base.tile, strict=True))]

    def info(self) -> DatasetInfo:
        return self._info

    def read_block(self, variable: str, index: BlockIndex) -> np.ndarray:
        steps, *space = self._info.variable(variable).grid.slices(index)
        classes = np.ix_(*(axis.ids[s] for axis, s in zip(self._axes, space, strict=True)))
        block = np.empty([s.stop - s.start for s in (steps, *space)], dtype=np.float32)
        for i, step in enumerate(range(steps.start, steps.stop)):
            coarse = self._base.tiles.get_or_load((variable, step, self.k),
                                                  lambda s=step: self._coarse_tile(variable, s))
            block[i] = coarse[classes]
        return block

    def _coarse_tile(self, variable: str, step: int) -> np.ndarray:
        tile = self._base.tile_of(variable, step)
        if math.prod(axis.gathered for axis in self._axes) <= GATHER_LIMIT:
            coarse = self._gathered(tile)
        else:
            coarse = self._weighted(tile)
        coarse.flags.writeable = False
        return coarse

    def _gathered(self, tile: np.ndarray) -> np.ndarray:
        """Every class's window gathered from the tile (NaN past the far edge), coarsened by the rule."""
        values = tile[np.ix_(*(np.maximum(axis.index.ravel(), 0) for axis in self._axes))]
        for a, axis in enumerate(self._axes):
            edge = axis.index.ravel() < 0
            if edge.any():
                values[(slice(None),) * a + (edge,)] = np.nan
        return coarsen_block(values, {a: axis.window for a, axis in enumerate(self._axes)})

    def _weighted(self, tile: np.ndarray) -> np.ndarray:
        """Each class's mean as a weighted sum over the tile (weights: how often its window holds a point)."""
        coarse = tile.astype(np.float64)
        for a, axis in enumerate(self._axes):
            weights = np.zeros((len(axis.index), tile.shape[a]))
            for c, window in enumerate(axis.index):
                np.add.at(weights[c], window[window >= 0], 1.0)
            weights /= weights.sum(axis=1, keepdims=True)
            coarse = np.moveaxis(np.tensordot(weights, coarse, axes=(1, a)), 0, a)
        return coarse.astype(np.float32)

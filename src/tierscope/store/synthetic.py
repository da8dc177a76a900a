"""The synthetic origin: the sample's turbulence-like field, computed block by block on read.

``sample://NAME?shape=T,Z,Y,X[&block=t,z,y,x][&variables=u,v,w,p][&seed=0][&period=128][&levels=N]`` is a
dataset of any size that costs no disk: ``tierscope serve 'sample://turb?shape=10000,1024,2048,2048'`` serves a
~170 TB float32 variable. The sample generator (``store/sample.py``) needs one FFT over the whole space
per step, which no 2048^3 space affords per block; so the field here is periodic in space with a tile of
``min(n, period)`` points per spatial axis. Each (variable, step) tile is exactly what ``write_sample``
computes for a dataset whose space is the tile, and a block is the tile repeated periodically (a block
may straddle tile borders). When no spatial axis exceeds ``period``, the tile is the whole space and the
dataset is bit-identical to the store ``tierscope sample`` writes with the same shape, variables and seed.

Levels (``tierscope.levels``): all of them until one block per time step, or ``levels=N`` coarse ones at
most; computed on read from the same tiles (``store/synthetic_levels.py``).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from tierscope.cache import TierCache
from tierscope.grid import BlockIndex
from tierscope.levels import count_levels, layouts
from tierscope.metadata import DatasetInfo, VariableInfo
from tierscope.store.ingest import _positive_ints
from tierscope.store.origin import SYNTHETIC_SCHEME, Origin, is_synthetic
from tierscope.store.sample import (
    DIMS,
    SampleVariable,
    _check_seed,
    _check_variables,
    _dataset_attrs,
    _variable_attrs,
    sample_coords,
)

__all__ = ["SyntheticOrigin"]

log = logging.getLogger(__name__)

DEFAULT_BLOCK = (1, 64, 64, 64)
DEFAULT_PERIOD = 128
DEFAULT_VARIABLES = ("u", "v", "w", "p")
PARAMETERS = ("shape", "block", "variables", "seed", "period", "levels")
TILE_CACHE_BYTES = 256 * 2**20
"""Tiles kept: 32 of the default 8 MiB tile, so the steps that a few views and their prefetch touch across
four variables are computed once, not once per block; at least two tiles whatever the period (below)."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SyntheticOrigin(Origin):
    """A ``sample://`` dataset: blocks of the sample field, periodic in space, computed on read."""

    def __init__(self, url: str, name: str | None = None) -> None:
        try:
            params = _parse(url)
        except ValueError as exc:
            raise ValueError(f"bad synthetic dataset URL {url!r}: {exc}") from None
        self._locate(url, name, None)
        self.shape, self.block, self.variables, self.seed, self.period, self.coarse_levels = params
        self.tile = tuple(min(n, self.period) for n in self.shape[1:])
        self._info = self._describe()
        self._lock = threading.Lock()
        self._generators: dict[str, SampleVariable] = {}
        tile_bytes = int(np.prod(self.tile)) * np.dtype(np.float32).itemsize
        # Tiles by (variable, step); ``tiles.stats.misses`` counts tile computations. Threads read blocks
        # concurrently: single flight computes one tile per (variable, step) for all its blocks. Two tiles
        # at least, so a large period still reuses a tile across the blocks of one step.
        self.tiles: TierCache[np.ndarray] = TierCache(
            max(TILE_CACHE_BYTES, 2 * tile_bytes), f"{self.name} tiles", policy="lru"
        )

    def _describe(self) -> DatasetInfo:
        variables = {
            name: VariableInfo(name, DIMS, self.shape, np.dtype(np.float32), self.block,
                               _variable_attrs(name))
            for name in self.variables
        }
        attrs = {**_dataset_attrs(self.seed), "origin": "synthetic", "period": self.period}
        info = DatasetInfo(self.name, attrs, variables, sample_coords(self.shape))
        levels = count_levels(layouts(info), DIMS[1:])
        if self.coarse_levels is not None:
            levels = min(levels, 1 + self.coarse_levels)
        return replace(info, levels=levels)

    def info(self) -> DatasetInfo:
        return self._info

    def read_block(self, variable: str, index: BlockIndex) -> np.ndarray:
        steps, *space = self._info.variable(variable).grid.slices(index)
        block = np.empty([s.stop - s.start for s in (steps, *space)], dtype=np.float32)
        for i, step in enumerate(range(steps.start, steps.stop)):
            block[i] = _periodic(self.tile_of(variable, step), space)
        return block

    def tile_of(self, variable: str, step: int) -> np.ndarray:
        """The variable's tile at ``step`` (read-only, cached)."""
        return self.tiles.get_or_load((variable, step), lambda: self._compute(variable, step))

    def _open_level(self, k: int, name: str) -> Origin:
        from tierscope.store.synthetic_levels import SyntheticLevel

        return SyntheticLevel(self, k, name)

    def _compute(self, variable: str, step: int) -> np.ndarray:
        tile = self._generator(variable).step(step)
        tile.flags.writeable = False  # shared by every block of the step
        return tile

    def _generator(self, variable: str) -> SampleVariable:
        """The variable's generator, built once (its coefficients cost an FFT over the tile)."""
        with self._lock:
            generator = self._generators.get(variable)
            if generator is None:
                generator = self._generators[variable] = SampleVariable(self.tile, variable, self.seed)
            return generator

    def drop_page_cache(self) -> int:
        log.info("%s: a synthetic dataset has no files, no page cache to drop", self.name)
        return 0

    def close(self) -> None:
        super().close()
        self.tiles.clear()


def _periodic(tile: np.ndarray, space: Sequence[slice]) -> np.ndarray:
    """The elements ``space`` of ``tile`` repeated periodically: a view of the tile where each slice
    falls inside one period, a gathered copy along the axes where it straddles a tile border."""
    out = tile
    for axis, (s, n) in enumerate(zip(space, tile.shape, strict=True)):
        start, size = s.start % n, s.stop - s.start
        if start + size <= n:
            out = out[(slice(None),) * axis + (slice(start, start + size),)]
        else:
            out = np.take(out, np.arange(start, start + size), axis=axis, mode="wrap")
    return out


class _Params(NamedTuple):
    shape: tuple[int, ...]
    block: tuple[int, ...]
    variables: tuple[str, ...]
    seed: int
    period: int
    levels: int | None


def _parse(url: str) -> _Params:
    """The URL's parameters, validated, with defaults filled in."""
    if not is_synthetic(url):
        raise ValueError(f"expected a {SYNTHETIC_SCHEME}://NAME?shape=T,Z,Y,X URL")
    parts = urlsplit(url)
    if not _NAME.match(parts.netloc):
        raise ValueError(f"the dataset name must be letters, digits, '.', '_' or '-', got {parts.netloc!r} "
                         f"(expected {SYNTHETIC_SCHEME}://NAME?shape=T,Z,Y,X)")
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"expected {SYNTHETIC_SCHEME}://NAME?shape=T,Z,Y,X, with nothing after NAME but "
                         "the parameters")
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in PARAMETERS:
            raise ValueError(f"unknown parameter {key!r} (known: {', '.join(PARAMETERS)})")
        if key in query:
            raise ValueError(f"parameter {key!r} is given twice")
        query[key] = value
    if "shape" not in query:
        raise ValueError("the parameter 'shape' is missing (shape=T,Z,Y,X)")
    shape = _positive_ints(_ints(query["shape"], "shape"), "shape", ndim=len(DIMS))
    if "block" in query:
        block = _positive_ints(_ints(query["block"], "block"), "block", ndim=len(DIMS))
    else:
        block = tuple(min(b, n) for b, n in zip(DEFAULT_BLOCK, shape, strict=True))
    variables = DEFAULT_VARIABLES
    if "variables" in query:
        variables = _check_variables(query["variables"].split(","))
    seed = _check_seed(_int(query.get("seed", "0"), "seed"))
    period = _int(query.get("period", str(DEFAULT_PERIOD)), "period")
    if period < 2:
        raise ValueError(f"period must be an integer >= 2, got {period}")
    levels = _int(query["levels"], "levels") if "levels" in query else None
    if levels is not None and levels < 0:
        raise ValueError(f"levels (coarse levels beyond level 0) must be an integer >= 0, got {levels}")
    return _Params(shape, block, variables, seed, period, levels)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{what} must be an integer, got {text!r}") from None

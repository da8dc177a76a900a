"""Progressive views: a level-0 selection shown from a coarse level first, then finer ones, ending exact.

``tierscope.progressive(ds.u.isel(time=5, z=10))`` maps the selection onto each coarse level (level ``k``
is level 0 coarsened by ``2**k`` along the spatial dimensions, ``tierscope.levels``): a range
``start:stop`` of level 0 becomes ``start // 2**k : ceil(stop / 2**k)`` there, an integer ``i`` becomes
``i // 2**k``, and time is never coarsened. It loads that level's selection (its blocks go through the
same tiers and prefetch as any view), yields it, and goes on to the next finer level, ending with the
selection itself. A coarse level holds ``8**k`` times fewer blocks, so it can be on screen long before
level 0 arrives. Once the first part is out, level 0 loads in a background thread beside the finer
coarse levels, so the exact picture comes about when it would without levels; a coarse level with more
than 1/32 of level 0's blocks is skipped (it would only delay level 0: ``CHEAP``).

A view held in L1: beside the first part, level 0 is read from copies only (``direct.copies_only``: each
owner answers with its parts if it holds all of them decoded in L1, else with nothing at once, having
loaded nothing). Held — a view the prefetch saw coming, as in playback — level 0 is then on hand when the
first part is, one round trip after the view began rather than two, and no finer coarse part is loaded:
the view is the first part, then level 0 (counted as ``held_views`` in ``stats()``). Not held, level 0
loads after the first part as below. The first part still goes first: it is itself a copy (the coarsest
level is kept decoded in L1, ``dask.coarse.COARSEST_L1_SHARE``). Without a connected client (no direct
reads) nothing is asked.

The module is not named ``progressive`` because ``tierscope.progressive`` is the function: importing a
submodule of that name would replace the function on the package.

Cancellation: one view per (dataset, variable, tol) is current. A newer ``progressive`` call for the
same variable makes an older one stop before its next level (and drop a part whose load finished after
the newer call), and stops the older one's level-0 read on the owners (``direct.cancellable``): a slider
moved twice does not finish loading the first position. The levels it did not load count as
``cancelled_blocks`` in ``stats()``.

``budget_ms``: the first level is the finest whose expected time fits the budget, expected = its block
count x the measured seconds per block of this variable (an exponentially weighted mean over earlier
parts of this process); without a budget, or before anything is measured, the coarsest level.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from types import ModuleType
from typing import Any, NamedTuple, overload

import numpy as np
import xarray as xr
from xarray.core import indexing

from tierscope.backend import BlockArray
from tierscope.client.source import Source
from tierscope.errors import NotHeldError, ReadCancelledError
from tierscope.levels import layouts, level_info, level_name, spatial_dims, split_level, windows
from tierscope.metadata import VariableInfo
from tierscope.protocol import BlockSpec

__all__ = ["progressive", "stats"]

# Weight of the newest measurement in a variable's seconds-per-block mean.
SPEED_WEIGHT = 0.3
# Datasets (source, tol) whose levels stay open; the least recently used are closed beyond this.
MAX_PYRAMIDS = 8


class _Range(NamedTuple):
    """A selection's extent along one dimension, in that dimension's points at some level."""

    start: int
    stop: int
    scalar: bool  # an integer key: the dimension is dropped from the result

    def key(self) -> int | slice:
        return self.start if self.scalar else slice(self.start, self.stop)

    def coarsened(self, window: int) -> _Range:
        return _Range(self.start // window, -(-self.stop // window), self.scalar)


class _Pyramid:
    """A dataset's levels at one tol, each opened once in this process (``xr.open_dataset(..., level=k)``)."""

    def __init__(self, source: Source, tol: float) -> None:
        self.source, self.tol = source, tol
        self.info = source.transport().info(source.dataset)
        self.spatial = spatial_dims(layouts(self.info))
        self._lock = threading.Lock()
        self._datasets: dict[int, xr.Dataset] = {}
        self._variables: dict[int, dict[str, VariableInfo]] = {}

    def dataset(self, k: int) -> xr.Dataset:
        with self._lock:
            if k not in self._datasets:
                self._datasets[k] = xr.open_dataset(
                    self.source.url, engine="tierscope", level=k, tol=self.tol, token=self.source.token,
                    storage_options=self.source.storage_options)
            return self._datasets[k]

    def variable(self, name: str, k: int) -> VariableInfo:
        """Level ``k``'s description of a variable (its shape and clipped block), from the one rule."""
        with self._lock:
            if k not in self._variables:
                base = split_level(self.info.name)[0]
                self._variables[k] = level_info(self.info, k, level_name(base, k)).variables
            return self._variables[k][name]

    def close(self) -> None:
        with self._lock:
            datasets, self._datasets = list(self._datasets.values()), {}
        for ds in datasets:
            ds.close()


_lock = threading.Lock()
_pyramids: OrderedDict[tuple[Source, float], _Pyramid] = OrderedDict()
_current: dict[tuple[Source, str, float], _View] = {}  # variable -> its newest view
_seconds_per_block: dict[tuple[Source, str, float], float] = {}
_counts = {"views": 0, "parts": 0, "blocks": 0, "cancelled_views": 0, "cancelled_blocks": 0, "held_views": 0}


def stats() -> dict[str, int]:
    """This process's progressive-view counters: ``views`` started, ``parts`` yielded, ``blocks`` loaded
    for them, ``cancelled_views`` stopped by a newer view of the same variable and ``cancelled_blocks``,
    the blocks of the levels those views did not load, and ``held_views``, views whose level 0 its owners
    held decoded in L1, loaded with no finer coarse part."""
    with _lock:
        return dict(_counts)


def _count(**deltas: int) -> None:
    with _lock:
        for name, n in deltas.items():
            _counts[name] += n


def _pyramid(source: Source, tol: float) -> _Pyramid:
    key = (source, tol)
    with _lock:
        pyramid = _pyramids.get(key)
        if pyramid is not None:
            _pyramids.move_to_end(key)
            return pyramid
    pyramid = _Pyramid(source, tol)  # asks for the dataset's description: not under the lock
    with _lock:
        pyramid = _pyramids.setdefault(key, pyramid)
        _pyramids.move_to_end(key)
        evicted = [_pyramids.popitem(last=False)[1] for _ in range(len(_pyramids) - MAX_PYRAMIDS)]
    for old in evicted:
        old.close()
    return pyramid


def _lazy_key(selection: xr.DataArray) -> tuple[BlockSpec, tuple[Any, ...]]:
    """The block-served variable under a lazy selection, and the selection's key into it.

    Walks xarray's wrappers of a lazily indexed backend array (``Variable._data``: MemoryCachedArray,
    CopyOnWriteArray, decoding wrappers, ... down to ``LazilyIndexedArray(BlockArray, key)``).
    """
    if not isinstance(selection, xr.DataArray):
        raise TypeError(f"progressive views take an xarray DataArray, got {type(selection).__name__}")
    data = selection.variable._data
    while True:
        if isinstance(data, indexing.LazilyIndexedArray) and isinstance(data.array, BlockArray):
            return data.array.spec, data.key.tuple
        if isinstance(data, indexing.LazilyVectorizedIndexedArray):
            raise ValueError(f"{selection.name!r} is transposed or indexed with arrays together "
                             "(vectorized indexing); progressive views map integer and slice selections")
        if isinstance(data, np.ndarray | indexing.NumpyIndexingAdapter):
            raise ValueError(f"{selection.name!r} holds loaded values (an in-memory array, or a selection "
                             "after .load(), .values or .plot()); progressive views need a lazy selection "
                             "of a dataset opened with engine='tierscope': select again from the dataset")
        if hasattr(data, "dask"):
            raise ValueError(f"{selection.name!r} is a dask array (opened with chunks=...); progressive "
                             "views need a dataset opened with engine='tierscope' and no chunks")
        inner = getattr(data, "array", None)
        if inner is None:
            raise ValueError(f"{selection.name!r} is not a lazy selection of a dataset opened with "
                             "engine='tierscope'; progressive views need one")
        data = inner


def _ranges(key: tuple[Any, ...], var: VariableInfo, name: object) -> tuple[_Range, ...]:
    """Level-0 extents of an integer/slice key with unit steps, or an error naming the dimension."""
    ranges = []
    for k, dim, n in zip(key, var.dims, var.shape, strict=True):
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step != 1:
                raise ValueError(f"{name!r} steps by {step} along {dim!r}; progressive views map unit steps")
            if start >= stop:
                raise ValueError(f"{name!r} is empty along {dim!r}")
            ranges.append(_Range(start, stop, False))
        elif isinstance(k, int | np.integer):
            i = int(k) + n if k < 0 else int(k)
            ranges.append(_Range(i, i + 1, True))
        else:
            raise ValueError(f"{name!r} is indexed with an array along {dim!r} (fancy indexing); "
                             "progressive views map integer and slice selections")
    return tuple(ranges)


class _View:
    """One progressive view: the selection, where it sits at every level, and its place among views."""

    def __init__(self, selection: xr.DataArray) -> None:
        spec, key = _lazy_key(selection)
        base, level = split_level(spec.source.dataset)
        if level:
            raise ValueError(f"{selection.name!r} is a selection of level {level} ({spec.source.url}); "
                             "progressive views start from level 0")
        self.selection = selection
        self.spec, self.index = spec, key  # the level-0 variable and the selection's key into it
        self.variable = spec.variable
        self.pyramid = _pyramid(spec.source, spec.tol)
        self.var = self.pyramid.info.variable(spec.variable)
        self.ranges = _ranges(key, self.var, selection.name)
        kept = tuple(d for d, r in zip(self.var.dims, self.ranges, strict=True) if not r.scalar)
        if kept != selection.dims:
            raise ValueError(f"{selection.name!r} has dims {selection.dims}, but its data are {kept} of "
                             f"{base!r}; progressive views map selections with the dataset's dimensions")
        self.levels = self.pyramid.info.levels
        self.key = (spec.source, spec.variable, spec.tol)
        self.stop = _direct_cancel()  # stops this view's level-0 read; None: that read cannot be stopped
        self.cancelled = False
        with _lock:
            older = _current.get(self.key)
            _current[self.key] = self
            _counts["views"] += 1
        if older is not None and older.stop is not None:
            older.stop.set()

    def ranges_at(self, k: int) -> tuple[_Range, ...]:
        axes = windows(self.var.dims, self.var.shape, self.pyramid.spatial, k)
        return tuple(r.coarsened(axes.get(axis, 1)) for axis, r in enumerate(self.ranges))

    def blocks(self, k: int) -> int:
        """How many of level ``k``'s blocks the selection touches."""
        block = self.pyramid.variable(self.variable, k).block
        return math.prod((r.stop - 1) // b - r.start // b + 1 for r, b in zip(self.ranges_at(k), block))

    def first_level(self, budget_ms: float | None) -> int:
        coarsest = self.levels - 1
        with _lock:
            per_block = _seconds_per_block.get(self.key)
        if budget_ms is None or per_block is None:
            return coarsest
        return next((k for k in range(coarsest) if self.blocks(k) * per_block * 1e3 <= budget_ms), coarsest)

    def load(self, k: int, stop: Any = None) -> xr.DataArray:
        """Level ``k``'s part, its level in ``encoding["tierscope_level"]``; level 0 is the selection.

        A coarse part is not a view of its own: it moves no position (``direct.unreported``), so it plans
        no prefetch of its own; the level-0 read plans the coarse levels around the view already. ``stop``
        (a coarse part's): stops its direct read, which then raises ``ReadCancelledError``."""
        if k == 0:
            with _cancellable(self.stop):
                part = self.selection.compute()
        else:
            level = self.pyramid.dataset(k)[self.variable]
            part = level.isel(dict(zip(self.var.dims, (r.key() for r in self.ranges_at(k)), strict=True)))
            with _unreported(), _cancellable(stop):
                part = part.compute().rename(self.selection.name)
        part.encoding["tierscope_level"] = k
        return part

    def held(self) -> xr.DataArray | None:
        """Level 0's part if its owners hold all of it decoded in L1 (``direct.copies_only``: copies, one
        request per owner), else None, nothing loaded; None without direct reads."""
        direct = _direct()
        if direct is None or not direct.connected():
            return None
        try:
            with direct.copies_only():
                return self.load(0)
        except NotHeldError:
            return None

    def measured(self, blocks: int, seconds: float) -> None:
        per_block = seconds / blocks
        with _lock:
            old = _seconds_per_block.get(self.key)
            _seconds_per_block[self.key] = per_block if old is None else (
                SPEED_WEIGHT * per_block + (1 - SPEED_WEIGHT) * old)

    def superseded(self) -> bool:
        with _lock:
            return _current.get(self.key) is not self

    def cancel(self, levels: Sequence[int]) -> None:
        """Count this view cancelled (once), with the blocks of ``levels`` it did not load."""
        if not self.cancelled:
            self.cancelled = True
            _count(cancelled_views=1, cancelled_blocks=sum(self.blocks(k) for k in levels))

    def retire(self) -> None:
        with _lock:
            if _current.get(self.key) is self:
                del _current[self.key]


def _parts(view: _View, levels: range) -> Generator[xr.DataArray, None, None]:
    """The parts, coarse to fine. Once the first is out, level 0 loads in the background beside the finer
    coarse levels, so the exact picture comes about as soon as it would without levels; only coarse levels
    at most ``1 / CHEAP`` of level 0's blocks are loaded on the way (dearer ones would delay it), and one
    still loading when level 0 is ready is passed over: level 0 never waits for a coarser part. Level 0
    does not load with the first part: on a busy machine its 64 blocks' reads and decodes delayed the
    first picture 2-4x (docs/benchmarks.md); beside it, level 0 is only read from its owners' L1 copies
    (``_View.held``), which loads nothing. A newer view stops its read (``view.stop``)."""
    first, *rest = levels
    finer = [k for k in rest if k and view.blocks(k) * CHEAP <= view.blocks(0)]
    full: Future[xr.DataArray] | None = None
    try:
        if view.superseded():  # a newer view began before this one's first part
            view.cancel([first, *finer, 0] if first else [0])
            return
        held = _background.submit(view.held) if first else None  # level 0, if held, beside the first part
        part = _timed(view, first)
        if view.superseded():  # loaded after a newer view began: stale, and the rest is not loaded
            view.cancel([*finer, 0] if first else [])
            return
        _count(parts=1)
        yield part
        if not first:
            return
        if view.superseded():
            view.cancel([*finer, 0])
            return
        exact = held.result() if held is not None else None
        if exact is not None:  # level 0 was a copy on its owners: here already, nothing on the way to it
            _count(held_views=1, blocks=view.blocks(0))
            if view.superseded():  # (a newer view began while the copies came: stale)
                view.cancel([])
                return
            _count(parts=1)
            yield exact
            return
        full = _background.submit(_timed, view, 0)
        for i, k in enumerate(finer):
            if view.superseded():  # level 0 counts as cancelled when its read was stopped
                view.cancel(finer[i:] + [0] * (view.stop is not None))
                return
            drop = _direct_cancel()  # stops this part's read once level 0 is ready (its work would only
            # take the cores from the next view)
            coarse = _background.submit(_timed, view, k, drop)
            wait((coarse, full), return_when=FIRST_COMPLETED)
            if view.superseded():  # a newer view began while this part loaded: stale
                view.cancel(finer[i + 1:] + [0] * (view.stop is not None))
                return
            if full.done():  # the exact part is ready: a coarser one now would only hold it back
                if drop is not None:
                    drop.set()
                break
            _count(parts=1)
            yield coarse.result()
        part = full.result()
        if not view.superseded():
            _count(parts=1)
            yield part
    except ReadCancelledError:  # level 0's read, stopped by a newer view
        view.cancel([0])
    finally:
        if full is not None and view.stop is not None:
            view.stop.set()  # left early (a newer view, or the caller closed the parts): stop level 0
        view.retire()


def _timed(view: _View, k: int, stop: Any = None) -> xr.DataArray:
    """Level ``k``'s part, its load time measured (for ``budget_ms``) and its blocks counted; ``stop``: as
    for ``_View.load``."""
    if k:
        view.pyramid.dataset(k)  # opening a level once is not part of its load time
    blocks = view.blocks(k)
    t0 = time.perf_counter()
    part = view.load(k, stop)
    view.measured(blocks, time.perf_counter() - t0)
    _count(blocks=blocks)
    return part


def _direct() -> ModuleType | None:
    """Direct reads (``tierscope.dask.direct``), or None without distributed."""
    try:
        from tierscope.dask import direct
    except ImportError:
        return None
    return direct


def _unreported() -> contextlib.AbstractContextManager:
    direct = _direct()  # without distributed: no positions to keep
    return contextlib.nullcontext() if direct is None else direct.unreported()


def _direct_cancel() -> Any:
    """A stop signal for a view's level-0 read (a ``direct.Cancel``) when it reads directly, else None."""
    direct = _direct()
    return direct.Cancel() if direct is not None and direct.connected() else None


def _cancellable(stop: Any) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if stop is None else _direct().cancellable(stop)


# A coarse level is loaded on the way to level 0 when it has at most 1/CHEAP of its blocks. 32: a 512^2
# z-slice of 64 blocks goes from level 3 (1 block) straight to level 0; its level 2 (4 blocks) beside
# level 0 cost 7-29% of the time to full resolution on 2 cores (A/B on the large bench, 1/8 against 1/32:
# full-resolution mean 1.07-1.29x that of plain tierscope against 0.90-1.17x), its decodes and fetches
# taking the cores and the link from level 0's.
CHEAP = 32
# Level-0 loads and the finer coarse ones beside them: two per progressive view in flight, a few views at
# a time.
_background = ThreadPoolExecutor(8, thread_name_prefix="tierscope-progressive")


@overload
def progressive(selection: xr.DataArray, on_update: None = None, *,
                budget_ms: float | None = None) -> Iterator[xr.DataArray]: ...


@overload
def progressive(selection: xr.DataArray, on_update: Callable[[xr.DataArray], object], *,
                budget_ms: float | None = None) -> xr.DataArray | None: ...


def progressive(
    selection: xr.DataArray,
    on_update: Callable[[xr.DataArray], object] | None = None,
    *,
    budget_ms: float | None = None,
) -> Iterator[xr.DataArray] | xr.DataArray | None:
    """The selection from a coarse level first, then each finer level, ending with the selection itself.

    ``selection``: a lazy integer/slice selection (``isel``/``sel`` with unit steps) of a level-0
    variable opened with ``engine="tierscope"`` (no ``chunks``). Each part is loaded (NumPy-backed), has
    the selection's dims and name, the level's coordinates (spatial ones coarsened as the level has them)
    and its level in ``part.encoding["tierscope_level"]``; the last, level 0, is ``selection.compute()``.
    Coarse levels are opened with xarray's default decoding at the selection's ``tol``.

    Without ``on_update``: an iterator of the parts (the view is registered at once, so a later call for
    the same variable cancels it even before its first part). With ``on_update``: calls it with each part
    in this thread and returns the level-0 part, or None when a newer view cancelled this one first.

    ``budget_ms``: start from the finest level expected to load within it (see the module docstring).
    """
    if budget_ms is not None and (isinstance(budget_ms, bool) or not isinstance(budget_ms, int | float)
                                  or not 0 < budget_ms < math.inf):
        raise ValueError(f"budget_ms must be a positive number of milliseconds, got {budget_ms!r}")
    view = _View(selection)
    parts = _parts(view, range(view.first_level(budget_ms), -1, -1))
    if on_update is None:
        return parts
    last = None
    try:
        for last in parts:
            on_update(last)
    finally:
        parts.close()  # an on_update that raised still leaves the variable to newer views at once
    return last if last is not None and last.encoding["tierscope_level"] == 0 else None

"""Levels: a dataset's multiscale pyramid, and the one coarsening rule that stores, the synthetic origin
and the tests all follow.

Level 0 is the stored data. Level ``k`` is level 0 coarsened by ``2**k`` along the *spatial* dimensions
(never time), on the same block shape, and it is served as the dataset ``NAME@k``:

- spatial dimensions: those of the dataset's largest variable (most dimensions, then bytes) except its
  time axis, so auxiliary dimensions (a ``bound`` of 2) stay; a dimension of length 1 never shrinks;
- floating-point values: the mean of each window, exactly as ``xr.Variable.coarsen(windows, "mean",
  boundary="pad")`` computes it with NumPy — NaN skipped, so a partial window at the far edge averages
  what is there — so a level equals ``ds.coarsen(...).mean()`` of level 0 bit for bit. Raw values are
  averaged: a float ``_FillValue``/``missing_value`` counts as missing (as xarray's decoding makes it),
  and a window with nothing but missing values stores the fill value;
- other values (integers, booleans, strings): the first element of each window ("nearest"), since a
  mean of category codes or packed integers means nothing;
- coordinates of spatial dimensions: the mean of the level-0 values each window covers (xarray's
  ``coord_func="mean"``); the first value for non-numeric ones;
- blocks: the level-0 block, clipped to the level's (smaller) shape like any block;
- how many: levels 0, 1, ... up to the first at which every spatial axis of every variable fits in one
  block; a caller may ask for fewer.

Each level is computed from level 0 directly, never from level ``k - 1``: a mean of means rounds
differently from the mean of the same values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import xarray as xr

from tierscope.grid import BlockGrid
from tierscope.metadata import DatasetInfo, VariableInfo, time_axis

__all__ = [
    "Layout", "check_level", "coarsen_block", "coarsen_coord", "coarsen_levels", "coarser_grid",
    "count_levels", "layouts", "level_axes", "level_info", "level_name", "level_shape", "missing_values",
    "spatial_dims", "split_level", "window_layout", "windows",
]

_LEVEL_NAME = re.compile(r"^(.+)@([0-9]+)$")


class Layout(NamedTuple):
    """What the rule needs to know of one variable."""

    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    block: tuple[int, ...]


def layouts(info: DatasetInfo) -> list[Layout]:
    """The layouts of a dataset's block-served variables."""
    return [Layout(v.dims, v.shape, v.dtype, v.block) for v in info.variables.values()]


def spatial_dims(variables: Iterable[Layout]) -> tuple[str, ...]:
    """The dimensions levels coarsen: the largest variable's (most dims, then bytes) but its time axis."""
    largest = max(variables, key=lambda v: (len(v.dims), math.prod(v.shape) * v.dtype.itemsize),
                  default=None)
    if largest is None:
        return ()
    t = time_axis(largest.dims)
    return tuple(d for i, d in enumerate(largest.dims) if i != t)


def windows(dims: Sequence[str], shape: Sequence[int], spatial: Sequence[str], k: int) -> dict[int, int]:
    """Axis -> window of level ``k`` for one variable: spatial axes longer than 1 (a window over a single
    element would change nothing)."""
    return {axis: 2**k for axis, (d, n) in enumerate(zip(dims, shape, strict=True)) if d in spatial and n > 1}


def level_shape(shape: Sequence[int], axes: Mapping[int, int]) -> tuple[int, ...]:
    return tuple(-(-n // axes.get(axis, 1)) for axis, n in enumerate(shape))


def level_axes(info: DatasetInfo, var: VariableInfo) -> tuple[int, ...]:
    """The axes of ``var`` that the dataset's levels coarsen (its spatial dimensions)."""
    spatial = spatial_dims(layouts(info))
    return tuple(axis for axis, d in enumerate(var.dims) if d in spatial)


def coarser_grid(grid: BlockGrid, axes: Sequence[int], steps: int) -> BlockGrid:
    """The grid ``steps`` levels coarser than ``grid`` (itself at any level), ``axes`` being the variable's
    ``level_axes``: as ``level_info`` derives it from level 0, since ``ceil(ceil(n / a) / b) == ceil(n /
    (a * b))`` and a level's block is level 0's clipped to the level's shape."""
    if steps == 0:
        return grid
    shape = level_shape(grid.shape, dict.fromkeys(axes, 2**steps))
    block = tuple(min(b, n) if axis in axes else b
                  for axis, (b, n) in enumerate(zip(grid.block, shape, strict=True)))
    return BlockGrid(shape, block)


def count_levels(variables: Iterable[Layout], spatial: Sequence[str]) -> int:
    """Levels 0..k up to the first at which every spatial axis of every variable fits in one block."""
    sizes = [(n, b) for v in variables
             for d, n, b in zip(v.dims, v.shape, v.block, strict=True) if d in spatial]
    k = 0
    while any(-(-n // 2**k) > b for n, b in sizes):
        k += 1
    return k + 1


def level_name(name: str, k: int) -> str:
    """The dataset name level ``k`` is served under: ``NAME@k``, level 0 plain ``NAME``."""
    return name if k == 0 else f"{name}@{k}"


def split_level(name: str) -> tuple[str, int]:
    """``"turb@2"`` -> ``("turb", 2)``; a name without ``@DIGITS`` is level 0 of itself."""
    match = _LEVEL_NAME.match(name)
    return (match[1], int(match[2])) if match else (name, 0)


def check_level(level: object, levels: int, name: str) -> int:
    """A valid level of a dataset with ``levels`` levels, or an error naming the valid range."""
    if isinstance(level, bool) or not isinstance(level, int | np.integer):
        raise TypeError(f"level must be an integer, got {level!r}")
    if not 0 <= level < levels:
        valid = "0 only (it has no coarse levels)" if levels == 1 else f"0..{levels - 1}"
        raise ValueError(f"dataset {name!r} has no level {level}: its levels are {valid}")
    return int(level)


def missing_values(attrs: Mapping[str, Any]) -> list[float]:
    """The non-NaN ``_FillValue``/``missing_value`` numbers of a float variable's raw attributes."""
    found: list[float] = []
    for key in ("_FillValue", "missing_value"):
        raw = np.asarray(attrs.get(key, []))
        if raw.dtype.kind in "iuf":
            found += [float(v) for v in raw.ravel().tolist() if not math.isnan(v)]
    return found


def coarsen_block(values: np.ndarray, axes: Mapping[int, int], missing: Sequence[float] = ()) -> np.ndarray:
    """Coarsen ``values`` by ``axes`` (axis -> window) under the rule. ``values`` is a piece of level 0
    whose start is window-aligned on every coarsened axis; only its end may cut a window (the far edge)."""
    axes = {a: w for a, w in axes.items() if w > 1}
    if not axes:
        return values
    if values.dtype.kind not in "fc":
        return values[tuple(slice(None, None, axes.get(a, 1)) for a in range(values.ndim))]
    values = np.ascontiguousarray(values)
    if missing:
        values = np.where(np.isin(values, missing), np.nan, values).astype(values.dtype, copy=False)
    pad = [(0, -n % axes.get(a, 1)) for a, n in enumerate(values.shape)]
    if any(after for _, after in pad):  # xarray's boundary="pad": NaN, which the mean skips
        values = np.pad(values, pad, constant_values=np.nan)
    out = _nanmean(values, axes)
    if missing:
        out = np.where(np.isnan(out), missing[0], out).astype(values.dtype, copy=False)
    return out


def coarsen_levels(values: np.ndarray, levels: Sequence[Mapping[int, int]],
                   missing: Sequence[float] = ()) -> list[np.ndarray]:
    """``coarsen_block`` of ``values`` by each of ``levels``' windows (one level's ``axes`` each): where
    they are a level's windows on the last three axes (or fewer) of floats that need no padding and hold
    no missing values, every level's sums come from one pass over ``values``, then each level is
    divided (or, holding a NaN, summed again as ``coarsen_block`` does)."""
    ndim = values.ndim
    triples = [tuple(axes.get(a, 1) for a in range(ndim - 3, ndim)) for axes in levels]
    sums = None
    if (not missing and ndim >= 3 and values.dtype.kind == "f"
            and all(set(axes) <= set(range(ndim - 3, ndim)) for axes in levels)):
        from tierscope.coarsen_kernel import level_sums  # compiles on first use: not on import

        sums = level_sums(np.ascontiguousarray(values), triples)
    if sums is None:
        return [coarsen_block(values, axes, missing) for axes in levels]
    out = []
    for axes, total in zip(levels, sums, strict=True):
        if np.isnan(total).any():  # a NaN among the values (or inf - inf): the counts matter
            out.append(coarsen_block(values, axes))
        else:
            out.append(_divided(total, math.prod(axes.values())))
    return out


def _divided(total: np.ndarray, count: int) -> np.ndarray:
    """``total / count`` as xarray's mean divides (in float64 by an integer, rounded back), in place. A
    count that is a power of two, as every whole window's is, divides exactly in ``total``'s own type
    where ``1 / count`` is one of its numbers (float16 has none below 2**-24): the quotient is ``total``
    scaled by a power of two, rounded once either way (to a subnormal, say), and it skips converting
    every value to float64 and back."""
    scale = total.dtype.type(1 / count)
    if count & (count - 1) == 0 and float(scale) * count == 1:
        return np.multiply(total, scale, out=total)
    return np.true_divide(total, np.intp(count), out=total, casting="unsafe")


def _nanmean(values: np.ndarray, axes: Mapping[int, int]) -> np.ndarray:
    """What xarray's coarsen mean computes with NumPy: ``np.nanmean`` over the window axes of ``values``
    reshaped to (n / w, w) pairs — a sum of the values with NaN as 0, divided by an integer count of the
    others (``casting="unsafe"``). Without NaN the plain sum is that sum: a NaN would have made it NaN."""
    total = _window_sum(values, axes)
    if not np.isnan(total).any():
        count: np.ndarray | np.intp = np.intp(math.prod(axes.values()))
    else:  # a NaN among the values (or inf - inf: summed again, the same NaN)
        valid = ~np.isnan(values)
        total = _window_sum(np.where(valid, values, 0), axes)
        count = _window_sum(valid.astype(np.intp), axes)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0: a window of NaN only, NaN
        return np.true_divide(total, count, out=total, casting="unsafe")


def _window_sum(values: np.ndarray, axes: Mapping[int, int]) -> np.ndarray:
    """``np.add.reduce`` over the window axes of ``values`` reshaped to (n / w, w) pairs, bit for bit.

    NumPy walks that array in memory order, its iterator leaving out axes of length 1 and merging
    neighbours of one kind (window or not): into each output value it adds, one after the other, the
    pairwise sum of each run of the innermost window axis. At 2 to 16 values a run, that is one call per
    run; ``coarsen_kernel`` does the same additions in one compiled pass (NumPy itself for layouts the
    kernel has no loop for)."""
    from tierscope.coarsen_kernel import window_sums  # compiles on first use: not on import

    total = window_sums(values, window_layout(values.shape, axes))
    split = [(n // axes.get(a, 1), axes.get(a, 1)) for a, n in enumerate(values.shape)]
    if total is None:
        reduce = tuple(range(1, 2 * values.ndim, 2))
        return np.add.reduce(values.reshape([size for pair in split for size in pair]), axis=reduce)
    return total.reshape([size for size, _ in split])


def window_layout(shape: Sequence[int], axes: Mapping[int, int]) -> list[tuple[int, bool]]:
    """``shape`` split into (n / w, w) pairs as NumPy's iterator walks it: (size, is a window) from the
    outermost, axes of length 1 left out, neighbours of one kind merged."""
    layout: list[tuple[int, bool]] = []
    for a, n in enumerate(shape):
        for size, window in ((n // axes.get(a, 1), False), (axes.get(a, 1), True)):
            if size != 1 and layout and layout[-1][1] == window:
                layout[-1] = (layout[-1][0] * size, window)
            elif size != 1:
                layout.append((size, window))
    return layout


def coarsen_coord(values: np.ndarray, window: int) -> np.ndarray:
    """A spatial coordinate at a level: the mean of the values each window covers (the first, when they
    are not numbers)."""
    if window <= 1 or len(values) <= 1:
        return values
    if values.dtype.kind not in "iuf":
        return values[::window]
    return xr.Variable(("d",), values).coarsen({"d": window}, "mean", boundary="pad").values


def level_info(info: DatasetInfo, k: int, name: str) -> DatasetInfo:
    """Level ``k``'s description, derived from level 0's: what every format's stored level, and the
    synthetic origin's computed one, must describe."""
    if k == 0:
        return info
    spatial = spatial_dims(layouts(info))
    variables = {}
    for var_name, var in info.variables.items():
        shape = level_shape(var.shape, windows(var.dims, var.shape, spatial, k))
        block = tuple(min(b, n) if d in spatial else b
                      for d, b, n in zip(var.dims, var.block, shape, strict=True))
        variables[var_name] = VariableInfo(var_name, var.dims, shape, var.dtype, block, var.attrs)
    coords = {
        dim: (coarsen_coord(values, 2**k) if dim in spatial else values, attrs)
        for dim, (values, attrs) in info.coords.items()
    }
    return replace(info, name=name, variables=variables, coords=coords)

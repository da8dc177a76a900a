"""Pyramids: a store's coarse levels (``tierscope.levels``), written by ``tierscope ingest --levels N``
(in the same pass as level 0), ``tierscope pyramid STORE`` and ``tierscope sample --levels N`` (both from
the stored level 0).

Level ``k`` is a complete dataset beside level 0 — every variable (coarsened where it has spatial
dimensions, as is otherwise), its coordinates coarsened, the same attributes — chunked by the same block:

- zarr v3: the group ``k`` of the store (``turb.zarr/1/u``), so ``xr.open_zarr("turb.zarr", group="1")``
  reads it; the root's ``ome`` attribute lists the levels as OME-Zarr 0.5 ``multiscales``, one entry per
  variable with spatial dimensions (paths ``u``, ``1/u``, ...; a ``scale`` of ``2**k`` per coarsened axis,
  and the ``translation`` of a window's centre);
- TileDB: the group ``k`` inside the store's group, a member of it; HDF5: the group ``/k``. Both record
  the count in the root's ``_tierscope`` bookkeeping.

Each level is computed from level 0 in window-aligned dask pieces (``coarsen_levels``), all levels from
the same pieces, on all cores; then regrouped into whole blocks of the level (each written once, by one
task). ``pyramid`` writes the levels beside the store and puts them in place at the end (HDF5: into a
copy of the file, renamed over it), as ingest does: an interrupt or a failure leaves the store as it was.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from tierscope.levels import (
    Layout,
    coarsen_coord,
    coarsen_levels,
    count_levels,
    level_shape,
    missing_values,
    spatial_dims,
    windows,
)
from tierscope.metadata import time_axis
from tierscope.store.ingest import (
    Progress,
    _commit,
    _counted,
    _delete,
    _piece,
    _signals_held,
    _write_partial,
    write_groups,
)
from tierscope.store.origin import OME, Origin, detect_format, is_synthetic, open_origin

__all__ = ["check_count", "level_datasets", "multiscales", "pyramid", "set_levels"]


def check_count(levels: int | None) -> int | None:
    """How many coarse levels were asked for: an integer >= 0, or None for all that fit."""
    if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or levels < 0):
        raise ValueError(f"levels must be a non-negative integer (coarse levels beyond level 0), "
                         f"got {levels!r}")
    return levels


def _variable_layouts(ds: xr.Dataset) -> dict[Hashable, Layout]:
    """The block-served variables of a raw dataset about to be written (``encoding["chunks"]``)."""
    return {name: Layout(tuple(map(str, var.dims)), var.shape, var.dtype, tuple(var.encoding["chunks"]))
            for name, var in ds.variables.items() if var.dims != (name,)}


def level_datasets(ds: xr.Dataset, levels: int | None = None) -> list[xr.Dataset]:
    """Levels 1, 2, ... of a raw level-0 dataset as ingest writes it (dask pieces that are whole blocks,
    ``encoding["chunks"]`` = block): at most ``levels`` (None: all until one block per time step)."""
    found = _variable_layouts(ds)
    spatial = spatial_dims(found.values())
    count = count_levels(found.values(), spatial) - 1
    count = count if levels is None else min(count, levels)
    if count and any(str(name).isdigit() for name in ds.variables):
        raise ValueError(f"variable names that are numbers clash with the levels' groups: "
                         f"{list(ds.variables)}")
    out: list[dict[Hashable, xr.Variable]] = [{} for _ in range(count)]
    for name, var in ds.variables.items():
        for k, coarse in enumerate(_coarse_variables(name, var, spatial, count), 1):
            out[k - 1][name] = coarse
    return [xr.Dataset({n: v[n] for n in ds.data_vars}, coords={n: v[n] for n in ds.coords}, attrs=ds.attrs)
            for v in out]


def _coarse_variables(name: Hashable, var: xr.Variable, spatial: Sequence[str],
                      top: int) -> list[xr.Variable]:
    """Levels 1..``top`` of one variable, all from the same pieces (aligned to level ``top``'s windows)."""
    if var.dims == (name,):
        coords = [coarsen_coord(var.values, 2**k) if str(name) in spatial else var.values
                  for k in range(1, top + 1)]
        return [xr.Variable(var.dims, values, var.attrs, {"chunks": values.shape, "_FillValue": None})
                for values in coords]
    levels = [windows(tuple(map(str, var.dims)), var.shape, spatial, k) for k in range(1, top + 1)]
    if not levels or not levels[0]:
        return [var] * top
    missing = missing_values(var.attrs) if var.dtype.kind in "fc" else []
    blocks = []
    for axes in levels:
        shape = level_shape(var.shape, axes)
        blocks.append(tuple(min(b, n) if a in axes else b
                            for a, (b, n) in enumerate(zip(var.encoding["chunks"], shape, strict=True))))
    if isinstance(var.data, da.Array):
        data = _coarse_pieces(_aligned(var.data, levels[-1], 2**top), levels, missing, blocks)
    else:  # in memory (labels): one piece
        data = coarsen_levels(np.asarray(var.values), levels, missing)
    return [xr.Variable(var.dims, values, var.attrs, {"chunks": block, "_FillValue": None})
            for values, block in zip(data, blocks, strict=True)]


def _aligned(data: da.Array, axes: Mapping[int, int], window: int) -> da.Array:
    """Pieces starting on multiples of the top level's ``window`` along the coarsened axes (so every
    level's windows fall inside one piece): unchanged when the blocks already align, as powers of two do."""
    chunks = list(data.chunks)
    for axis in axes:
        n = data.shape[axis]
        ends = sorted({min(n, -(-end // window) * window) for end in np.cumsum(chunks[axis]).tolist()})
        chunks[axis] = tuple(np.diff([0, *ends]).tolist())
    return data.rechunk(tuple(chunks))


def _coarse_pieces(data: da.Array, levels: list[dict[int, int]], missing: list[float],
                   blocks: list[tuple[int, ...]]) -> list[da.Array]:
    """Each piece coarsened on its own to every level at once (``coarsen_levels``: one pass over it),
    then each level regrouped into whole blocks of the level (a stored chunk is then written by one
    task, never by two)."""
    one = tuple((1,) * len(sizes) for sizes in data.chunks)
    pieces = data.map_blocks(_piece_levels, levels, missing, chunks=one, dtype=object,
                             meta=np.empty((0,) * data.ndim, object))
    out = []
    for k, (axes, block) in enumerate(zip(levels, blocks, strict=True)):
        chunks = tuple(tuple(-(-c // axes.get(a, 1)) for c in sizes) for a, sizes in enumerate(data.chunks))
        coarse = pieces.map_blocks(_piece_level, k, chunks=chunks, dtype=data.dtype,
                                   meta=np.empty((0,) * data.ndim, data.dtype))
        target = {a: max(b, max(coarse.chunks[a]) // b * b) for a, b in enumerate(block) if a in axes}
        out.append(coarse.rechunk(target))
    return out


def _piece_levels(values: np.ndarray, levels: list[dict[int, int]], missing: list[float]) -> np.ndarray:
    """A piece's levels, held in a one-element object array (a dask chunk of its own)."""
    held = np.empty((1,) * values.ndim, object)
    held.flat[0] = coarsen_levels(values, levels, missing)
    return held


def _piece_level(held: np.ndarray, k: int) -> np.ndarray:
    return held.flat[0][k]


def multiscales(variables: Mapping[Hashable, Layout], levels: int) -> dict[str, Any]:
    """The root's ``ome`` attribute: OME-Zarr 0.5 ``multiscales``, one entry per variable with spatial
    dimensions, those OME-Zarr calls images (2 or 3 spatial axes after at most a time axis) first, then
    by name (a source's variables may be listed in any order)."""
    spatial = spatial_dims(variables.values())
    entries = []
    for name, var in variables.items():
        if not windows(var.dims, var.shape, spatial, 1):
            continue
        t = time_axis(var.dims)
        axes = [{"name": d, "type": "space"} if d in spatial else {"name": d, "type": "time"} if a == t
                else {"name": d} for a, d in enumerate(var.dims)]
        datasets = []
        for k in range(levels):
            coarsened = windows(var.dims, var.shape, spatial, k)
            factors = [coarsened.get(a, 1) for a in range(len(var.dims))]
            transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [float(f) for f in factors]}]
            if k:  # a window's centre, in level-0 pixels
                transforms.append({"type": "translation", "translation": [(f - 1) / 2 for f in factors]})
            path = f"{k}/{name}" if k else str(name)
            datasets.append({"path": path, "coordinateTransformations": transforms})
        entries.append({"name": str(name), "axes": axes, "datasets": datasets,
                        "type": "mean" if var.dtype.kind in "fc" else "nearest"})
    entries.sort(key=lambda entry: (not _is_image(entry["axes"]), entry["name"]))
    return {"version": "0.5", "multiscales": entries}


def _is_image(axes: list[dict[str, str]]) -> bool:
    """What OME-Zarr 0.5 calls an image: 2 or 3 space axes last, before them a time axis and/or one
    other, in that order."""
    types = [axis.get("type") for axis in axes]
    space = types.count("space")
    head = types[: len(types) - space]
    return 2 <= space <= 3 and types[len(head):] == ["space"] * space and head in ([], ["time"], [None],
                                                                                   ["time", None])


def set_levels(store: Path, fmt: str, level0: xr.Dataset, levels: int) -> None:
    """Record in the store's root that it has ``levels`` levels (written in place before)."""
    if fmt == "zarr":
        import zarr

        group = zarr.open_group(store, mode="r+", zarr_format=3)
        if levels > 1:
            group.attrs[OME] = multiscales(_variable_layouts(level0), levels)
        elif OME in group.attrs:
            del group.attrs[OME]
    elif fmt == "tiledb":
        from tierscope.store import tiledb

        tiledb.set_levels(store, levels)
    else:
        from tierscope.store import hdf5

        hdf5.set_levels(store, levels)


def pyramid(store: str | os.PathLike[str], levels: int | None = None, overwrite: bool = False,
            progress: Progress | None = None) -> int:
    """Add coarse levels to a local store (zarr v3, TileDB, HDF5) from its level 0: ``levels`` of them
    (None: all until one block per time step). A store that has levels already is refused unless
    ``overwrite``, which replaces them. ``progress(bytes_read, bytes_total)`` hears of the level-0 pieces
    read. Returns the store's number of levels, level 0 included."""
    levels = check_count(levels)
    path = Path(store)
    if is_synthetic(store):
        raise ValueError(f"a sample:// dataset computes its levels on read: nothing to write for {store!r}")
    if "://" in str(store):
        raise ValueError(f"pyramid writes beside a local store, not at the URL {str(store)!r}")
    fmt = detect_format(path)  # a StoreError naming the path when nothing (or no store) is there
    path = path.resolve()
    origin = open_origin(path)
    try:
        info = origin.info()
        if info.levels > 1 and not overwrite:
            raise FileExistsError(f"{store} already has {info.levels - 1} coarse level(s); "
                                  "pass overwrite=True to rebuild them")
        level0 = _read_dataset(origin)
        if progress is not None:
            level0 = _counted(level0, progress)
        coarse = level_datasets(level0, levels)
        groups = [(str(k), ds) for k, ds in enumerate(coarse, 1)]
        if fmt == "hdf5":
            _write_hdf5_levels(path, groups, level0)
        else:
            _write_levels(path, fmt, groups, level0, info.levels)
    finally:
        origin.close()
    return 1 + len(coarse)


def _write_levels(store: Path, fmt: str, groups: list[tuple[str, xr.Dataset]], level0: xr.Dataset,
                  old_levels: int) -> None:
    """zarr, TileDB: each level written as ``.NAME.levels-PID/k`` beside the store, then moved in (the old
    levels out)."""
    staging = store.with_name(f".{store.name}.levels-{os.getpid()}")
    _delete(staging)
    staging.mkdir()
    _write_partial(staging, lambda: write_groups(fmt, staging, groups))
    old = staging / "old"
    with _signals_held():
        old.mkdir()
        for k in range(1, old_levels):
            (store / str(k)).rename(old / str(k))
        for name, _ in groups:
            (staging / name).rename(store / name)
        set_levels(store, fmt, level0, 1 + len(groups))
        _delete(staging)


def _write_hdf5_levels(store: Path, groups: list[tuple[str, xr.Dataset]], level0: xr.Dataset) -> None:
    """HDF5: level 0 copied (as stored) into ``.NAME.partial-PID``, the levels added, renamed over it."""
    from tierscope.store.hdf5 import copy_root

    partial = store.with_name(f".{store.name}.partial-{os.getpid()}")
    _delete(partial)
    copy_root(store, partial)

    def write() -> None:
        write_groups("hdf5", partial, groups)
        set_levels(partial, "hdf5", level0, 1 + len(groups))

    _write_partial(partial, write)
    _commit(partial, store)


def _read_dataset(origin: Origin) -> xr.Dataset:
    """The origin's level 0 as the raw dataset ingest would write: variables as dask arrays of pieces
    (whole blocks, read through ``origin.read_block``), dimension coordinates in memory."""
    info = origin.info()
    coords = {name: xr.Variable((name,), values, attrs, {"chunks": values.shape, "_FillValue": None})
              for name, (values, attrs) in info.coords.items()}
    variables = {}
    for name, var in info.variables.items():
        reader = _BlockReader(origin, name)
        if var.dtype.kind == "O" or not var.shape:  # labels and scalars: small, in memory as in ingest
            data: Any = reader[tuple(slice(0, n) for n in var.shape)]
        else:
            pieces = _piece(var.shape, tuple(min(b, n) for b, n in zip(var.block, var.shape, strict=True)),
                            var.dtype.itemsize)
            data = da.from_array(reader, chunks=pieces, asarray=True, lock=False, fancy=False,
                                 name=f"tierscope-level0-{origin.name}-{name}")
        variables[name] = xr.Variable(var.dims, data, var.attrs, {"chunks": var.block, "_FillValue": None})
    return xr.Dataset(variables, coords=coords, attrs=info.attrs)


class _BlockReader:
    """A variable as dask's ``from_array`` wants it, read block by block from its origin."""

    def __init__(self, origin: Origin, variable: str) -> None:
        self.origin, self.variable = origin, variable
        var = origin.info().variable(variable)
        self.grid, self.shape, self.dtype, self.ndim = var.grid, var.shape, var.dtype, len(var.shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        if not self.ndim:
            return np.asarray(self.origin.read_block(self.variable, ()))
        box = [(s.start or 0, self.shape[a] if s.stop is None else s.stop) for a, s in enumerate(key)]
        out = np.empty([stop - start for start, stop in box], dtype=self.dtype)
        first = [start // b for (start, _), b in zip(box, self.grid.block)]
        last = [max(start, stop - 1) // b for (start, stop), b in zip(box, self.grid.block)]
        for index in np.ndindex(*[hi - lo + 1 for lo, hi in zip(first, last)]):
            index = tuple(i + lo for i, lo in zip(index, first))
            block = self.origin.read_block(self.variable, index)
            region = self.grid.slices(index)
            inner = tuple(slice(max(r.start, lo), min(r.stop, hi)) for r, (lo, hi) in zip(region, box))
            out[tuple(slice(s.start - lo, s.stop - lo) for s, (lo, _) in zip(inner, box))] = \
                block[tuple(slice(s.start - r.start, s.stop - r.start) for s, r in zip(inner, region))]
        return out

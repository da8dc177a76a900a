"""The TileDB origin: a dataset is a TileDB group with one dense array per variable, tiles = blocks.

Layout (``NAME.tdb/``, written by ``tierscope ingest --format tiledb``):

- the group's metadata: the dataset attributes, and ``_tierscope`` (JSON: the variables in order);
- ``NAME.tdb/VAR``: a dense array with one ``uint64`` dimension per variable dimension, named after
  it, domain ``[0, n-1]``, tile extent = the block; one attribute named ``VAR`` holding the raw values
  (zstd); the array's metadata holds the variable attributes and ``_tierscope`` (JSON: the dims).
  A dimension coordinate's TileDB dimension is ``VAR_index`` (a dimension and an attribute cannot
  share a name); a 0-d variable is a one-cell array on a dimension ``VAR_scalar``.

Levels (``tierscope.levels``): level ``k`` is the TileDB group ``NAME.tdb/k``, laid out like the root
(every variable, coarsened), and a member of the root group; the root's ``_tierscope`` records
``levels``, the count with level 0.

Why a group rather than one array with an attribute per variable: the variables of a real dataset
differ in dimensions, shape and block (bounds, auxiliary coordinates, scalars), and a TileDB array has
one domain and one tiling. A block read is one slice read of exactly one tile.

One ``tiledb.Ctx`` per process is passed explicitly everywhere: ``tiledb.default_ctx`` lives in a
context variable, so every new thread would otherwise build its own context and thread pools, and a
context must not cross a fork.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tiledb
import xarray as xr

from tierscope.errors import StoreError
from tierscope.grid import BlockIndex
from tierscope.metadata import DatasetInfo, VariableInfo
from tierscope.store.attrs import RESERVED, pack, unpack
from tierscope.store.origin import Origin

__all__ = ["TileDBOrigin", "context", "is_group", "set_levels", "write_tiledb"]

Group = tuple[Path, Mapping[Hashable, xr.Variable], Mapping[Any, Any]]
"""One TileDB group to write: where, its raw variables (``encoding["chunks"]`` = block), its attributes."""

_lock = threading.RLock()
"""Guards the context and every origin's open arrays; re-made in a forked child (where another
thread may have held it at the fork)."""
_context: tuple[int, tiledb.Ctx] | None = None


def context() -> tiledb.Ctx:
    """This process's TileDB context, built on first use (and again in a forked child)."""
    global _context
    with _lock:
        if _context is None or _context[0] != os.getpid():
            _context = (os.getpid(), tiledb.Ctx())
        return _context[1]


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_reset_after_fork)


def is_group(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a TileDB group."""
    return tiledb.object_type(os.fspath(path), ctx=context()) == "group"


def _tiledb_dims(name: str, dims: tuple[str, ...]) -> list[str]:
    if not dims:
        return [f"{name}_scalar"]
    return [f"{dim}_index" if dim == name else dim for dim in dims]


def write_tiledb(groups: Sequence[Group]) -> None:
    """Write each ``(path, variables, attrs)`` as a new TileDB group, every piece of every group in one dask
    pass: a dataset and its levels, computed from the same pieces of level 0, read the source once."""
    ctx = context()
    with contextlib.ExitStack() as stack:
        sources, targets, names = [], [], []
        for out, variables, _ in groups:
            tiledb.group_create(str(out), ctx=ctx)
            names.append([])
            for key, var in variables.items():
                name = _check_name(key)
                array = stack.enter_context(_create(out / name, name, var, ctx))
                names[-1].append(name)
                if isinstance(var.data, da.Array):
                    sources.append(var.data)
                    targets.append(_Cells(array, var.ndim))
                else:
                    _Cells(array, var.ndim)[tuple(slice(0, n) for n in var.shape)] = var.values
        # one write per piece (each array's lock serialises its writes, while the other arrays' -- the
        # levels' -- and the reads of the source run in parallel); threads, even under a distributed
        # client: an open array cannot leave the process
        if sources:
            da.store(sources, targets, lock=False, scheduler="threads")
    # one read then opens one consolidated fragment-metadata file, however many pieces were written
    config = tiledb.Config({"sm.consolidation.mode": "fragment_meta"})
    for (out, _, attrs), members in zip(groups, names, strict=True):
        for name in members:
            tiledb.consolidate(str(out / name), ctx=ctx, config=config)
        with tiledb.Group(str(out), mode="w", ctx=ctx) as group:
            for name in members:
                group.add(name, name=name, relative=True)
            for meta_key, value in pack(attrs, variables=members).items():
                group.meta[meta_key] = value


@contextlib.contextmanager
def _create(uri: Path, name: str, var: xr.Variable, ctx: tiledb.Ctx) -> Iterator[tiledb.Array]:
    """A new dense array for ``var`` with its attributes, open for writing."""
    try:
        tiledb.DenseArray.create(str(uri), _schema(name, var, ctx), ctx=ctx)
    except tiledb.TileDBError as exc:
        raise StoreError(f"cannot store variable {name!r} ({var.dtype}) in TileDB: {exc}") from exc
    with tiledb.open(str(uri), mode="w", ctx=ctx) as array:
        for meta_key, value in pack(var.attrs, dims=[str(d) for d in var.dims]).items():
            array.meta[meta_key] = value
        yield array


def set_levels(root: Path, levels: int) -> None:
    """Record that the group at ``root`` has ``levels`` levels: groups ``root/1``... become members (and
    members beyond the count are dropped); ``_tierscope`` says how many."""
    ctx = context()
    with tiledb.Group(str(root), ctx=ctx) as group:
        present = {member.name for member in group if member.name and member.name.isdigit()}
        bookkeeping = json.loads(group.meta[RESERVED])
    bookkeeping["levels"] = levels
    with tiledb.Group(str(root), mode="w", ctx=ctx) as group:
        for name in sorted(present - {str(k) for k in range(1, levels)}):
            group.remove(name)
        for k in range(1, levels):
            if str(k) not in present:
                group.add(str(k), name=str(k), relative=True)
        group.meta[RESERVED] = json.dumps(bookkeeping)


def _check_name(key: Hashable) -> str:
    """A variable name that is also a safe member directory of the group."""
    name = str(key)
    if not name or "/" in name or name in (".", "..") or name.startswith("__"):
        raise StoreError(f"variable name {name!r} cannot name a TileDB array in a group")
    return name


def _schema(name: str, var: xr.Variable, ctx: tiledb.Ctx) -> tiledb.ArraySchema:
    shape, block = (var.shape, var.encoding["chunks"]) if var.ndim else ((1,), (1,))
    if 0 in shape:
        raise StoreError(f"variable {name!r} has an empty dimension {var.dims}: TileDB needs cells")
    dims = [
        tiledb.Dim(name=dim, domain=(0, n - 1), tile=b, dtype=np.uint64, ctx=ctx)
        for dim, n, b in zip(_tiledb_dims(name, var.dims), shape, block, strict=True)
    ]
    if var.dtype.kind in "OUST":
        attr = tiledb.Attr(name=name, dtype=str, var=True, ctx=ctx)
    else:
        filters = tiledb.FilterList([tiledb.ZstdFilter(ctx=ctx)], ctx=ctx)
        attr = tiledb.Attr(name=name, dtype=var.dtype, filters=filters, ctx=ctx)
    return tiledb.ArraySchema(
        domain=tiledb.Domain(*dims, ctx=ctx),
        attrs=[attr],
        sparse=False,
        cell_order="row-major",
        tile_order="row-major",
        ctx=ctx,
    )


class _Cells:
    """A dask ``store`` target writing into a dense array (a 0-d variable fills its one cell), one write
    at a time: threads do not share an open array's writes."""

    def __init__(self, array: tiledb.Array, ndim: int) -> None:
        self._array, self._ndim = array, ndim
        self._lock = threading.Lock()

    def __setitem__(self, region: tuple[slice, ...], values: np.ndarray) -> None:
        values = np.asarray(values)
        if self._ndim == 0:
            region, values = (slice(0, 1),), values.reshape(1)
        if values.dtype.kind in "UST":
            values = values.astype(object)
        with self._lock:
            self._array[region] = values


class TileDBOrigin(Origin):
    """A TileDB group written by ``write_tiledb``; arrays stay open per process after first use.
    ``levels``: a coarse level's group, opened by ``level()`` with the count of the root."""

    def __init__(
        self, path: str | os.PathLike[str], name: str | None = None, levels: int | None = None
    ) -> None:
        self._locate(Path(path), name, Path(path))
        self._arrays: tuple[int, dict[str, tiledb.Array]] = (os.getpid(), {})
        try:
            if not is_group(self.path):
                raise StoreError(f"cannot open store {self.location!r}: not a TileDB group")
            self._info = self._describe(levels)
        except (tiledb.TileDBError, KeyError) as exc:  # KeyError: bookkeeping naming what the group lacks
            raise StoreError(f"cannot open store {self.location!r} as a TileDB dataset: {exc!s}") from exc

    def _describe(self, levels: int | None) -> DatasetInfo:
        ctx = context()
        with tiledb.Group(self.location, ctx=ctx) as group:
            where = f"TileDB group {self.location!r}"
            attrs, bookkeeping = unpack(dict(group.meta.items()), where)
        variables, coords = {}, {}
        for name in bookkeeping.get("variables", []):
            with tiledb.open(str(self.path / name), ctx=ctx) as array:
                where = f"TileDB array {name!r} of {self.location!r}"
                var_attrs, var_bookkeeping = unpack(dict(array.meta.items()), where)
                dims = tuple(var_bookkeeping["dims"])
                if dims == (name,):
                    coords[name] = (array[:][name], var_attrs)
                    continue
                domain = array.schema.domain
                shape = tuple(int(d.domain[1]) + 1 for d in domain) if dims else ()
                block = tuple(int(d.tile) for d in domain) if dims else ()
                attr = array.schema.attr(0)
                dtype = np.dtype(object) if attr.isvar else np.dtype(attr.dtype)
                variables[name] = VariableInfo(name, dims, shape, dtype, block, var_attrs)
        levels = int(bookkeeping.get("levels", 1)) if levels is None else levels
        return DatasetInfo(name=self.name, attrs=attrs, variables=variables, coords=coords, levels=levels)

    def info(self) -> DatasetInfo:
        return self._info

    def _open_level(self, k: int, name: str) -> Origin:
        return TileDBOrigin(self.path / str(k), name, levels=self._info.levels)

    def read_block(self, variable: str, index: BlockIndex) -> np.ndarray:
        var = self._info.variable(variable)
        selection = var.grid.slices(index) or (slice(0, 1),)
        try:
            block = self._array(variable)[selection][variable]
        except tiledb.TileDBError as exc:
            raise StoreError(
                f"reading block {tuple(index)} of {variable!r} from {self.location!r} failed: {exc}"
            ) from exc
        return block.reshape(()) if var.grid.ndim == 0 else block

    def _array(self, variable: str) -> tiledb.Array:
        """This process's open array (opening reads the fragment metadata: once, not per block)."""
        with _lock:
            pid, arrays = self._arrays
            if pid != os.getpid():
                self._arrays = pid, arrays = os.getpid(), {}
            array = arrays.get(variable)
            if array is None:
                array = arrays[variable] = tiledb.open(str(self.path / variable), ctx=context())
            return array

    def close(self) -> None:
        super().close()
        with _lock:
            pid, arrays = self._arrays
            self._arrays = (os.getpid(), {})
        if pid == os.getpid():
            for array in arrays.values():
                array.close()

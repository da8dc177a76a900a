"""The HDF5 origin: a dataset is one HDF5 file with a chunked HDF5 dataset per variable, chunks = blocks.

Layout (``NAME.h5``, written by ``tierscope ingest --format hdf5``):

- root attributes: the dataset attributes, and ``_tierscope`` (JSON: the variables in order);
- ``/VAR``: the raw values, chunked by the block (shuffle + gzip level 1: any HDF5 reader decodes it),
  with the variable attributes and ``_tierscope`` (JSON: the dims) as HDF5 attributes. Dimension
  coordinates are 1-D datasets like any other variable; a 0-d variable is a scalar dataset.
- levels (``tierscope.levels``): level ``k`` is the group ``/k``, laid out like the root (every variable,
  coarsened, and the same attributes); the root's ``_tierscope`` records ``levels``, the count with level 0.

h5py holds one global lock, so threads gain nothing by reading one file concurrently: each origin
reads under one lock of its own, through a file handle opened once per process (HDF5 handles must not
cross a fork).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import h5py
import numpy as np
import xarray as xr

from tierscope.errors import StoreError
from tierscope.grid import BlockIndex
from tierscope.metadata import DatasetInfo, VariableInfo
from tierscope.store.attrs import RESERVED, _text, pack, unpack
from tierscope.store.origin import Origin

__all__ = ["HDF5Origin", "copy_root", "set_levels", "write_hdf5"]

Group = tuple[str, Mapping[Hashable, xr.Variable], Mapping[Any, Any]]
"""One group to write: its name (``""``: the root), raw variables (``encoding["chunks"]`` = block),
attributes."""

_STRING = h5py.string_dtype()
_opening = threading.Lock()
"""Serialises opening a process's handle (re-made in a forked child, where it may have been held)."""


def _reset_after_fork() -> None:
    global _opening
    _opening = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def write_hdf5(out: Path, groups: Sequence[Group], mode: str = "w-") -> None:
    """Write each ``(name, variables, attrs)`` as a group of the HDF5 file ``out`` (``mode`` "w-": a new
    file; "a": add groups to one), every piece of every group in one dask pass: a dataset and its levels,
    computed from the same pieces of level 0, read the source once."""
    with h5py.File(out, mode) as file:
        sources, targets = [], []
        for group_name, variables, attrs in groups:
            node = file.create_group(group_name) if group_name else file
            names = []
            for key, var in variables.items():
                name = str(key)
                if not name or "/" in name or name in (".", ".."):
                    raise StoreError(f"variable name {name!r} cannot name an HDF5 dataset")
                dataset = _create(node, name, var)
                for attr_key, value in pack(var.attrs, dims=[str(d) for d in var.dims]).items():
                    dataset.attrs[attr_key] = value
                if isinstance(var.data, da.Array):
                    sources.append(var.data)
                    targets.append(dataset)
                else:
                    dataset[()] = var.values.astype(object) if var.dtype.kind in "UST" else var.values
                names.append(name)
            for attr_key, value in pack(attrs, variables=names).items():
                node.attrs[attr_key] = value
        if sources:  # threads: an open h5py dataset cannot leave the process
            da.store(sources, targets, lock=True, scheduler="threads")


def set_levels(path: Path, levels: int) -> None:
    """Record in the root's ``_tierscope`` that the file has ``levels`` levels (groups ``/1``...)."""
    with h5py.File(path, "a") as file:
        bookkeeping = json.loads(_text(file.attrs[RESERVED]))
        bookkeeping["levels"] = levels
        file.attrs[RESERVED] = json.dumps(bookkeeping)


def copy_root(src: Path, out: Path) -> None:
    """A new file ``out`` holding ``src``'s level 0 only (root attributes and variables, chunks copied as
    stored, not decoded): where ``tierscope pyramid`` adds levels without touching ``src``."""
    with h5py.File(src, "r") as source, h5py.File(out, "w-") as target:
        for key, value in source.attrs.items():
            target.attrs[key] = value
        _, bookkeeping = unpack(dict(source.attrs.items()), f"HDF5 file {str(src)!r}")
        for name in bookkeeping.get("variables", []):
            source.copy(source[name], target, name=name)


def _create(file: h5py.Group, name: str, var: xr.Variable) -> h5py.Dataset:
    chunks = tuple(var.encoding["chunks"]) if var.ndim and 0 not in var.shape else None
    options: dict[str, Any] = {}
    if var.dtype.kind in "OUST":
        dtype = _STRING
    else:
        dtype = var.dtype
        if chunks:
            options = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    try:
        return file.create_dataset(name, shape=var.shape, dtype=dtype, chunks=chunks, **options)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"cannot store variable {name!r} ({var.dtype}) in HDF5: {exc}") from exc


class HDF5Origin(Origin):
    """An HDF5 file written by ``write_hdf5``. ``group``/``levels``: a coarse level, the group ``/k``
    (``level()`` opens them with the root's count)."""

    def __init__(
        self, path: str | os.PathLike[str], name: str | None = None, group: str = "/",
        levels: int | None = None,
    ) -> None:
        self._locate(Path(path), name, Path(path))
        self._group = group
        self._handle: tuple[int, h5py.File, threading.Lock] | None = None
        try:
            file, lock = self._file()
            with lock:
                self._info = self._describe(file[group], levels)
        except (OSError, KeyError) as exc:  # KeyError: bookkeeping naming what the file lacks
            self.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open store {self.location!r} as an HDF5 dataset: {exc!s}") from exc

    def _file(self) -> tuple[h5py.File, threading.Lock]:
        """This process's read-only handle and its lock (both made anew in a forked child)."""
        with _opening:
            handle = self._handle
            if handle is None or handle[0] != os.getpid():
                handle = self._handle = (os.getpid(), h5py.File(self.path, "r"), threading.Lock())
            return handle[1], handle[2]

    def _describe(self, node: h5py.Group, levels: int | None) -> DatasetInfo:
        where = f"HDF5 group {self._group!r} of {self.location!r}"
        attrs, bookkeeping = unpack(dict(node.attrs.items()), where)
        variables, coords = {}, {}
        for name in bookkeeping.get("variables", []):
            dataset = node[name]
            where = f"HDF5 dataset {name!r} of {self.location!r}"
            var_attrs, var_bookkeeping = unpack(dict(dataset.attrs.items()), where)
            dims = tuple(var_bookkeeping["dims"])
            if dims == (name,):
                coords[name] = (_read(dataset, ()), var_attrs)
                continue
            strings = h5py.check_string_dtype(dataset.dtype) is not None
            variables[name] = VariableInfo(
                name=name,
                dims=dims,
                shape=tuple(dataset.shape),
                dtype=np.dtype(object) if strings else dataset.dtype,
                block=tuple(dataset.chunks or (max(1, n) for n in dataset.shape)),  # unchunked: one block
                attrs=var_attrs,
            )
        levels = int(bookkeeping.get("levels", 1)) if levels is None else levels
        return DatasetInfo(name=self.name, attrs=attrs, variables=variables, coords=coords, levels=levels)

    def info(self) -> DatasetInfo:
        return self._info

    def _open_level(self, k: int, name: str) -> Origin:
        return HDF5Origin(self.path, name, group=f"/{k}", levels=self._info.levels)

    def read_block(self, variable: str, index: BlockIndex) -> np.ndarray:
        var = self._info.variable(variable)
        selection = var.grid.slices(index)
        try:
            file, lock = self._file()
            with lock:
                return _read(file[self._group][variable], selection)
        except (OSError, KeyError) as exc:
            raise StoreError(
                f"reading block {tuple(index)} of {variable!r} from {self.location!r} failed: {exc}"
            ) from exc

    def close(self) -> None:
        super().close()
        handle, self._handle = self._handle, None
        if handle is not None and handle[0] == os.getpid():
            with handle[2]:
                handle[1].close()


def _read(dataset: h5py.Dataset, selection: tuple[slice, ...]) -> np.ndarray:
    """One selection: numbers straight into a new array (``read_direct``), strings as ``str``."""
    if h5py.check_string_dtype(dataset.dtype) is not None:
        return np.asarray(dataset.asstr()[selection], dtype=object)
    shape = tuple(s.stop - s.start for s in selection) if selection else dataset.shape
    out = np.empty(shape, dtype=dataset.dtype)
    dataset.read_direct(out, source_sel=selection or None)
    return out

"""The xarray backend: ``xr.open_dataset(url_or_path, engine="tierscope", tol=...)``.

Variables come back lazily indexed, in xarray's usual way, and CF-decoded by xarray itself. A selection
(``ds.u.isel(time=5, z=10).values`` or ``.plot()``) becomes one small dask graph of block-load tasks
keyed ``(name, *block_index)``, one per stored block it touches, computed on the active Dask client (the
scheduler sees which blocks the user is looking at) or on dask's local scheduler without one. Every block
goes through the worker's L1/L2 tiers; a view whose blocks all sit in their owners' L1 is read from them
directly, without a graph (``tierscope.dask.direct``). ``chunks={}`` gives dask arrays chunked by the
stored blocks.

Levels (``tierscope.levels``): ``level=k`` opens level ``k`` of the dataset (the dataset ``NAME@k``: every
tier, tol, prefetch and statistic applies as to any dataset), and ``xr.open_datatree(..., engine=
"tierscope")`` gives every level, children ``"0"``, ``"1"``, ... of an empty root. Each opened dataset says
which level it is and how many there are in ``ds.encoding["tierscope_level"]`` and
``["tierscope_levels"]``.

A lossy view (``tol > 0``) says so on each block-served variable: attributes ``tierscope_tol`` (the bound,
on the stored raw values) and ``tierscope_codec``, so ``to_netcdf``/``to_zarr`` of the view carry its
provenance, and the same two keys in ``encoding``. A lossless view's values are the stored ones: only
``encoding["tierscope_tol"] == 0.0``, attributes unchanged. ``ds.close()`` releases the store's files
(``Source.release``).

Why not return dask arrays from the backend: xarray wraps every backend variable (``CopyOnWriteArray``),
and dask's default optimisation fuses ``from_array`` loads into the slicing after them; see
docs/architecture.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.backends.common import AbstractDataStore
from xarray.backends.store import StoreBackendEntrypoint
from xarray.core import indexing

from tierscope.client.source import Source
from tierscope.dask.graph import block_array
from tierscope.dask.tiers import BlockSpec
from tierscope.levels import level_axes, split_level
from tierscope.metadata import VariableInfo, check_tol
from tierscope.store.origin import is_synthetic

__all__ = ["BlockArray", "TierscopeBackendEntrypoint", "TierscopeDataStore"]

_DATASET_URL = re.compile(r"^https?://[^/]+/datasets/[^/?#]+/?$")


def _inside_worker_task() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


def _warm_workers(source: Source) -> None:
    """Ready a connected client's workers for the first view (dask/direct.py)."""
    try:
        from tierscope.dask import direct
    except ImportError:  # no distributed installed: nothing to warm
        return
    direct.warm(source)


def _direct_read(spec: BlockSpec, dtype: np.dtype, key: tuple) -> np.ndarray | None:
    """The view straight from its owners' L1 when a connected Dask client allows it (dask/direct.py)."""
    try:
        from tierscope.dask import direct
    except ImportError:  # no distributed installed: dask's local schedulers only
        return None
    return direct.read(spec, dtype, key)


class BlockArray(BackendArray):
    """One block-served variable; picklable (a source descriptor, never a connection)."""

    __slots__ = ("dtype", "grid", "shape", "spec")

    def __init__(self, spec: BlockSpec, var: VariableInfo) -> None:
        self.spec = spec
        self.grid = var.grid
        self.shape = var.shape
        self.dtype = var.dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.BASIC, self._getitem
        )

    def _getitem(self, key: tuple) -> np.ndarray:
        if _inside_worker_task():  # e.g. a chunks={} load: this worker's tiers, no nested graph
            return np.asarray(block_array(self.spec, self.dtype)[key].compute(scheduler="sync"))
        direct = _direct_read(self.spec, self.dtype, key)
        if direct is not None:
            return direct
        return np.asarray(block_array(self.spec, self.dtype)[key].compute())


class TierscopeDataStore(AbstractDataStore):
    """The dataset as xarray's decoding machinery wants it: raw variables and attributes.

    It holds its source's transport from opening until ``close`` (``ds.close()``), which releases it: the
    last dataset of a store to close closes the store's files.
    """

    def __init__(self, source: Source, tol: float) -> None:
        self.source, self.tol = source, tol
        transport = source.acquire()
        try:
            self.info = transport.info(source.dataset)
            for var in self.info.variables.values():  # a pre-encoded store cannot honour a tighter tol
                var.check_view_tol(tol)
            self.codec = transport.codec() if tol > 0 else None
        except BaseException:
            source.release()
            raise
        _warm_workers(source)
        self._closed = False

    def get_variables(self) -> dict[str, xr.Variable]:
        variables = {
            name: xr.Variable((name,), values, attrs)
            for name, (values, attrs) in self.info.coords.items()
        }
        level = split_level(self.info.name)[1]
        for name, var in self.info.variables.items():
            spec = BlockSpec(self.source, name, self.tol, var.grid, var.dtype.str, var.time_axis,
                             level=level, levels=self.info.levels, level_axes=level_axes(self.info, var))
            encoding = {"chunks": var.block, "preferred_chunks": dict(zip(var.dims, var.block)),
                        **self._provenance()}
            attrs = {**var.attrs, **self._provenance()} if self.tol > 0 else dict(var.attrs)
            variables[name] = xr.Variable(var.dims, indexing.LazilyIndexedArray(BlockArray(spec, var)),
                                          attrs, encoding)
        return variables

    def _provenance(self) -> dict[str, Any]:
        """How the values were served: ``tierscope_tol`` (the bound) and, when lossy, ``tierscope_codec``."""
        if self.codec is None:
            return {"tierscope_tol": self.tol}
        return {"tierscope_tol": self.tol, "tierscope_codec": self.codec}

    def get_attrs(self) -> dict[str, Any]:
        return dict(self.info.attrs)

    def get_dimensions(self) -> dict[str, int]:
        return self.info.dims

    def close(self) -> None:
        """Release the transport once (xarray may call this more than once)."""
        if not self._closed:
            self._closed = True
            self.source.release()


class TierscopeBackendEntrypoint(BackendEntrypoint):
    """Open a tierscope dataset: ``http(s)://host:port/datasets/NAME``, a local store (a path or
    ``file://`` URL), a zarr store at an fsspec URL (``memory://``, ``s3://``, ... with
    ``storage_options=``) or a synthetic ``sample://NAME?shape=T,Z,Y,X`` dataset (docs/stores.md);
    ``level=k`` for one of its coarse levels, ``xr.open_datatree`` for all of them.

    Pass ``engine="tierscope"``: with netCDF4 installed, xarray hands every URL to netCDF4 before asking
    any other engine, so ``guess_can_open`` is only consulted without it.
    """

    description = "Explore block-served arrays through tiered caches on Dask workers (tierscope)"
    supports_groups = True
    open_dataset_parameters = (
        "filename_or_obj",
        "drop_variables",
        "tol",
        "token",
        "storage_options",
        "level",
        "mask_and_scale",
        "decode_times",
        "concat_characters",
        "decode_coords",
        "use_cftime",
        "decode_timedelta",
    )

    def open_dataset(  # type: ignore[override]
        self,
        filename_or_obj: str | os.PathLike[str],
        *,
        drop_variables: str | Iterable[str] | None = None,
        tol: float = 0.0,
        token: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        level: int = 0,
        mask_and_scale: bool = True,
        decode_times: bool = True,
        concat_characters: bool = True,
        decode_coords: bool = True,
        use_cftime: bool | None = None,
        decode_timedelta: bool | None = None,
    ) -> xr.Dataset:
        # token: the server's bearer token (default: the TIERSCOPE_TOKEN environment variable);
        # storage_options: fsspec's options for a store URL (credentials, endpoint)
        source = _source(filename_or_obj, token, storage_options).level(_check_level(level))
        return _open(source, check_tol(tol), drop_variables=drop_variables, mask_and_scale=mask_and_scale,
                     decode_times=decode_times, concat_characters=concat_characters,
                     decode_coords=decode_coords, use_cftime=use_cftime, decode_timedelta=decode_timedelta)

    def open_groups_as_dict(  # type: ignore[override]
        self,
        filename_or_obj: str | os.PathLike[str],
        *,
        drop_variables: str | Iterable[str] | None = None,
        tol: float = 0.0,
        token: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        **decoders: Any,
    ) -> dict[str, xr.Dataset]:
        """Every level of the dataset: ``{"/": empty root, "/0": level 0, "/1": level 1, ...}``."""
        source = _source(filename_or_obj, token, storage_options)
        if split_level(source.dataset)[1]:
            raise ValueError(f"{source.url} names one level; open the dataset's URL for all its levels")
        tol = check_tol(tol)
        groups = {"/0": _open(source, tol, drop_variables=drop_variables, **decoders)}
        try:
            for k in range(1, groups["/0"].encoding["tierscope_levels"]):
                groups[f"/{k}"] = _open(source.level(k), tol, drop_variables=drop_variables, **decoders)
        except BaseException:
            for ds in groups.values():
                ds.close()
            raise
        return {"/": xr.Dataset(), **groups}

    def open_datatree(  # type: ignore[override]
        self,
        filename_or_obj: str | os.PathLike[str],
        *,
        drop_variables: str | Iterable[str] | None = None,
        tol: float = 0.0,
        token: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        **decoders: Any,
    ) -> xr.DataTree:
        """Children ``"0"``, ``"1"``, ... are the levels (``open_groups_as_dict``)."""
        groups = self.open_groups_as_dict(filename_or_obj, drop_variables=drop_variables, tol=tol,
                                          token=token, storage_options=storage_options, **decoders)
        tree = xr.DataTree.from_dict(groups)
        for path, ds in groups.items():
            tree[path].set_close(ds.close)  # tree.close() releases every level's store
        return tree

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        return isinstance(filename_or_obj, str) and (
            bool(_DATASET_URL.match(filename_or_obj)) or is_synthetic(filename_or_obj)
        )


def _source(filename_or_obj: Any, token: str | None, storage_options: Mapping[str, Any] | None) -> Source:
    if not isinstance(filename_or_obj, str | os.PathLike):
        raise TypeError(
            f"engine='tierscope' opens a URL or a store path, got {type(filename_or_obj).__name__}"
        )
    return Source.parse(filename_or_obj, token=token, storage_options=storage_options)


def _check_level(level: object) -> int:
    """The level's type and sign here; its range where the dataset is (the server or store knows it)."""
    if isinstance(level, bool) or not isinstance(level, int | np.integer):
        raise TypeError(f"level must be an integer (0 = full resolution), got {level!r}")
    if level < 0:
        raise ValueError(f"level must be >= 0 (0 = full resolution), got {level}")
    return int(level)


def _open(source: Source, tol: float, **decoders: Any) -> xr.Dataset:
    store = TierscopeDataStore(source, tol)
    try:
        ds = StoreBackendEntrypoint().open_dataset(store, **decoders)
    except BaseException:  # no dataset to close later: release the store now
        store.close()
        raise
    ds.encoding.update(tierscope_level=split_level(store.info.name)[1], tierscope_levels=store.info.levels)
    return ds

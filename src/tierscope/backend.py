"""The xarray backend: ``xr.open_dataset(url_or_path, engine="tierscope", tol=...)``.

Variables come back lazily indexed, in xarray's usual way, and CF-decoded by xarray itself. A selection
(``ds.u.isel(time=5, z=10).values`` or ``.plot()``) becomes one small dask graph of block-load tasks
keyed ``(name, *block_index)``, one per stored block it touches, computed on the active Dask client (the
scheduler sees which blocks the user is looking at) or on dask's local scheduler without one. Every block
goes through the worker's L1/L2 tiers; a view whose blocks all sit in their owners' L1 is read from them
directly, without a graph (``tierscope.dask.direct``). ``chunks={}`` gives dask arrays chunked by the
stored blocks.

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
        for name, var in self.info.variables.items():
            spec = BlockSpec(self.source, name, self.tol, var.grid, var.dtype.str, var.time_axis)
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
    ``storage_options=``) or a synthetic ``sample://NAME?shape=T,Z,Y,X`` dataset (docs/stores.md).

    Pass ``engine="tierscope"``: with netCDF4 installed, xarray hands every URL to netCDF4 before asking
    any other engine, so ``guess_can_open`` is only consulted without it.
    """

    description = "Explore block-served arrays through tiered caches on Dask workers (tierscope)"
    open_dataset_parameters = (
        "filename_or_obj",
        "drop_variables",
        "tol",
        "token",
        "storage_options",
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
        mask_and_scale: bool = True,
        decode_times: bool = True,
        concat_characters: bool = True,
        decode_coords: bool = True,
        use_cftime: bool | None = None,
        decode_timedelta: bool | None = None,
    ) -> xr.Dataset:
        if not isinstance(filename_or_obj, str | os.PathLike):
            raise TypeError(
                f"engine='tierscope' opens a URL or a store path, got {type(filename_or_obj).__name__}"
            )
        # token: the server's bearer token (default: the TIERSCOPE_TOKEN environment variable);
        # storage_options: fsspec's options for a store URL (credentials, endpoint)
        source = Source.parse(filename_or_obj, token=token, storage_options=storage_options)
        store = TierscopeDataStore(source, check_tol(tol))
        try:
            return StoreBackendEntrypoint().open_dataset(
                store,
                mask_and_scale=mask_and_scale,
                decode_times=decode_times,
                concat_characters=concat_characters,
                decode_coords=decode_coords,
                drop_variables=drop_variables,
                use_cftime=use_cftime,
                decode_timedelta=decode_timedelta,
            )
        except BaseException:  # no dataset to close later: release the store now
            store.close()
            raise

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        return isinstance(filename_or_obj, str) and (
            bool(_DATASET_URL.match(filename_or_obj)) or is_synthetic(filename_or_obj)
        )

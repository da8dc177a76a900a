"""Whole chunks of a local zarr v3 array, and groups laid out like another, written without zarr's event
loop.

zarr-python hands every chunk write to its one event-loop thread as coroutines, futures and thread
hand-offs. For the 1 MiB blocks an ingest writes, that bookkeeping costs more CPU than compressing the
block (4-5.5 against 2.4 ms a block, dask's two threads on the 2-core VM) and holds the GIL meanwhile,
so the writing threads queue behind it. Where the array's codecs can encode synchronously (zarr's
``SupportsSyncCodec``, zarr >= 3.1.6) and its store is a ``LocalStore``, ``chunk_writer`` encodes each
chunk with those same codecs in the calling thread and stores it with ``LocalStore.set_sync``: the bytes
and keys zarr would write, from dask's threads side by side. Anything else is written by zarr, as before.

A coarse level's group is its level 0's but for the arrays' shapes and chunks: ``group_like`` writes its
zarr documents from level 0's, in a few milliseconds, where laying it out through xarray and zarr's loop
takes some 30 ms of CPU (about 20 round trips) a level.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = ["ChunkTarget", "chunk_writer", "group_like"]


class ChunkTarget(Protocol):
    """What ``da.store`` writes into: ``target[region] = values``."""

    def __setitem__(self, region: tuple[slice, ...], values: np.ndarray) -> None: ...


def chunk_writer(array: Any) -> ChunkTarget:
    """A target writing ``array``'s whole chunks directly where it can (see above), else ``array``. Every
    chunk is stored, a chunk of fill values too, as zarr does with ``write_empty_chunks=True`` (ingest's
    setting)."""
    from zarr.abc.codec import ArrayArrayCodec, SupportsSyncCodec
    from zarr.storage import LocalStore

    codecs = array.metadata.codecs
    direct = (isinstance(array.store_path.store, LocalStore)
              and not any(isinstance(codec, ArrayArrayCodec) for codec in codecs)
              and all(isinstance(codec, SupportsSyncCodec) for codec in codecs))
    return _SyncChunks(array) if direct else array


def group_like(model: Path, path: Path, arrays: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]],
               config: Mapping[str, Any]) -> dict[str, Any]:
    """Write the local zarr v3 group ``path`` as a copy of the group ``model`` (its attributes) whose arrays
    of the same names (dtype, fill value, codecs, attributes, dimension names) have ``arrays``' (shape,
    chunks) instead; return them as zarr arrays (with ``config``), their chunks not yet written."""
    import zarr
    from zarr.core.array import AsyncArray
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.chunk_grids import RegularChunkGrid
    from zarr.core.metadata.v3 import ArrayV3Metadata
    from zarr.storage import LocalStore, StorePath

    prototype = default_buffer_prototype()
    store = LocalStore(path)
    store.set_sync("zarr.json", prototype.buffer.from_bytes((model / "zarr.json").read_bytes()))
    out = {}
    for key, (shape, chunks) in arrays.items():
        like = ArrayV3Metadata.from_dict(json.loads((model / key / "zarr.json").read_bytes()))
        meta = replace(like, shape=tuple(shape), chunk_grid=RegularChunkGrid(chunk_shape=tuple(chunks)))
        store.set_sync(f"{key}/zarr.json", meta.to_buffer_dict(prototype)["zarr.json"])
        out[key] = zarr.Array(AsyncArray(meta, StorePath(store, key), dict(config)))
    return out


class _SyncChunks:
    """Encodes and stores whole chunks in the calling thread. A region that is not whole chunks, or
    values of another dtype (which zarr would cast), go to zarr."""

    def __init__(self, array: Any) -> None:
        from zarr.core.array_spec import ArrayConfig
        from zarr.core.buffer import default_buffer_prototype

        self._array, self._meta = array, array.metadata
        self._chunk = tuple(self._meta.chunk_grid.chunk_shape)
        self._prototype = default_buffer_prototype()
        self._spec = self._meta.get_chunk_spec((0,) * array.ndim, ArrayConfig.from_dict({}), self._prototype)
        self._store, self._path = array.store_path.store, array.store_path.path

    def __setitem__(self, region: tuple[slice, ...], values: np.ndarray) -> None:
        bounds = self._whole_chunks(region)
        if bounds is None or values.dtype != self._array.dtype:
            self._array[region] = values
            return
        chunk = self._chunk
        for coords in itertools.product(*(range(start // c, -(-stop // c))
                                          for (start, stop), c in zip(bounds, chunk, strict=True))):
            part = tuple(slice(i * c - start, (i + 1) * c - start)
                         for i, c, (start, _) in zip(coords, chunk, bounds, strict=True))
            self._write(coords, values[part])

    def _whole_chunks(self, region: tuple[slice, ...]) -> list[tuple[int, int]] | None:
        """(start, stop) per axis where ``region`` covers whole chunks (the last may end at the array's
        end), else None."""
        shape = self._array.shape
        if not isinstance(region, tuple) or len(region) != len(shape) or not all(
                isinstance(s, slice) for s in region):
            return None
        bounds = []
        for s, c, n in zip(region, self._chunk, shape, strict=True):
            start, stop, step = s.indices(n)
            if step != 1 or start % c or (stop % c and stop != n):
                return None
            bounds.append((start, stop))
        return bounds

    def _write(self, coords: tuple[int, ...], part: np.ndarray) -> None:
        """One chunk: an edge chunk is padded to the full chunk shape with the fill value, as zarr does."""
        if part.shape != self._chunk:
            full = np.full(self._chunk, self._meta.fill_value, dtype=part.dtype)
            full[tuple(slice(0, n) for n in part.shape)] = part
            part = full
        data = self._prototype.nd_buffer.from_numpy_array(np.ascontiguousarray(part))
        for codec in self._meta.codecs:
            data = codec._encode_sync(data, self._spec)
            if data is None:  # a codec that stores nothing for this chunk: zarr deletes the key
                break
        key = self._meta.encode_chunk_key(coords)
        key = f"{self._path}/{key}" if self._path else key
        if data is None:
            self._store.delete_sync(key)
        else:
            self._store.set_sync(key, data)

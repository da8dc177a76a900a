"""Origins: where blocks come from before any tier holds them.

An origin reads one stored block of one variable of one dataset. Three formats, all written by
``tierscope ingest`` (and ``tierscope sample`` for zarr) with stored chunks = blocks: zarr v3 (a local
directory or any fsspec URL), TileDB (a group of dense arrays, ``store/tiledb.py``) and HDF5 (one file
of chunked datasets, ``store/hdf5.py``). ``open_origin`` tells them apart by what is on disk, so
``tierscope serve`` and ``xr.open_dataset(path, engine="tierscope")`` take any of them. A
``sample://NAME?shape=...`` URL is the synthetic origin (``store/synthetic.py``): blocks computed on
read, nothing on disk.

A dataset's coarse levels (``tierscope.levels``) are origins too: ``origin.level(k)``, one object per
level, opened on first use and closed with the dataset's origin. A store keeps level ``k`` beside level 0
(zarr and TileDB: the group ``k`` inside the store; HDF5: the group ``/k``), written by
``store/pyramid.py``.
"""

from __future__ import annotations

import abc
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from tierscope.errors import StoreError
from tierscope.grid import BlockIndex
from tierscope.levels import check_level, level_name
from tierscope.metadata import DatasetInfo, VariableInfo

__all__ = [
    "FORMATS", "SYNTHETIC_SCHEME", "Origin", "ZarrOrigin", "dataset_name", "detect_format", "is_synthetic",
    "open_origin",
]

log = logging.getLogger(__name__)

FORMATS = ("zarr", "tiledb", "hdf5")
SUFFIXES = (".zarr", ".tiledb", ".tdb", ".hdf5", ".h5")
"""Store suffixes left out of the name a store is served under."""
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
SYNTHETIC_SCHEME = "sample"
"""The URL scheme of the synthetic origin: ``sample://NAME?shape=T,Z,Y,X&...``."""
OME = "ome"
"""The zarr root attribute holding the levels as OME-Zarr ``multiscales`` (``store/pyramid.py``): store
metadata, not a dataset attribute."""
_levels_lock = threading.Lock()


def _is_url(location: str | os.PathLike[str]) -> bool:
    return isinstance(location, str) and "://" in location


def is_synthetic(location: object) -> bool:
    """Whether ``location`` is a ``sample://`` URL (a synthetic dataset, not a store)."""
    return isinstance(location, str) and location.startswith(f"{SYNTHETIC_SCHEME}://")


def _local_path(location: str | os.PathLike[str]) -> Path | None:
    """The local path of a path or ``file://`` URL; None for a remote URL."""
    if not _is_url(location):
        return Path(location)
    parts = urlsplit(str(location))
    return Path(unquote(parts.path)) if parts.scheme == "file" else None


def dataset_name(location: str | os.PathLike[str]) -> str:
    """The name a store is served under: its file or directory name without a store suffix
    (``turb.zarr``, ``turb.tdb``, ``turb.h5`` and ``http://host/data/turb.zarr`` are all ``turb``);
    a ``sample://NAME?...`` URL is ``NAME``."""
    if is_synthetic(location):
        return urlsplit(str(location)).netloc
    local = _local_path(location)
    if local is not None:
        name = local.resolve().name
    else:
        name = urlsplit(str(location)).path.rstrip("/").rpartition("/")[2]
    for suffix in SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


class Origin(abc.ABC):
    """A dataset's source of raw blocks."""

    name: str
    location: str
    """Where the store is (path or URL), for messages."""
    path: Path | None = None
    """The local file or directory holding the store; None for a remote one."""
    base: Origin | None = None
    """Level 0's origin, for a coarse level's origin; None for level 0 itself."""

    def _locate(self, location: str | os.PathLike[str], name: str | None, path: Path | None) -> None:
        """Where the store is and what it is called; a local store must exist."""
        self.location, self.path = str(location), path
        self.name = name or dataset_name(location)
        self._levels: dict[int, Origin] = {}
        if path is not None and not path.exists():
            raise StoreError(f"cannot open store {self.location!r}: no such file or directory")

    def level(self, k: int) -> Origin:
        """Level ``k`` of the dataset (``tierscope.levels``): this origin for 0, else one origin per level,
        opened on first use; a ``ValueError`` naming the valid levels otherwise."""
        base = self.base or self
        k = check_level(k, base.info().levels, base.name)
        if k == 0:
            return base
        with _levels_lock:
            origin = base._levels.get(k)
            if origin is None:
                origin = base._levels[k] = base._open_level(k, level_name(base.name, k))
                origin.base = base
            return origin

    def _open_level(self, k: int, name: str) -> Origin:
        """Level ``k >= 1`` (< ``info().levels``) as an origin named ``name``."""
        raise NotImplementedError(f"{type(self).__name__} has no coarse levels")

    @abc.abstractmethod
    def info(self) -> DatasetInfo:
        """The dataset's description (raw variables, dimension coordinates, attributes)."""

    @abc.abstractmethod
    def read_block(self, variable: str, index: BlockIndex) -> np.ndarray:
        """One whole stored block, raw (not CF-decoded)."""

    def read_frame(self, variable: str, index: BlockIndex) -> bytes:
        """One stored block as the tierscope frame it is stored as (a pre-encoded store: the variable's
        ``stored_tol`` > 0), so serving it needs no encode."""
        raise StoreError(f"{self.location!r} holds no pre-encoded frames of {variable!r}")

    def close(self) -> None:
        """Release file handles, the levels' too (subclasses extend this)."""
        with _levels_lock:
            levels, self._levels = list(self._levels.values()), {}
        for origin in levels:
            origin.close()

    def drop_page_cache(self) -> int:
        """Ask the kernel to evict this store's files from the page cache, so that the next reads
        come from the disk (cold-cache experiments). Returns how many files were advised."""
        if self.path is None:
            log.info("%s: %s is remote, it has no local page cache to drop", self.name, self.location)
            return 0
        if not hasattr(os, "posix_fadvise"):
            log.info("%s: this platform has no posix_fadvise, page cache kept", self.name)
            return 0
        count = 0
        for file in _files(self.path):
            _drop_file(file)
            count += 1
        log.info("%s: dropped %d file(s) of %s from the page cache", self.name, count, self.path)
        return count


def _files(path: Path) -> Iterator[Path]:
    if path.is_file():
        yield path
    else:
        yield from (p for p in sorted(path.rglob("*")) if p.is_file())


def _drop_file(file: Path) -> None:
    """Flush, then drop: ``POSIX_FADV_DONTNEED`` leaves dirty pages (a fresh ingest) in memory."""
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class ZarrOrigin(Origin):
    """A zarr v3 group whose arrays carry xarray's ``dimension_names``: a local directory, or any
    fsspec URL (``http://``, ``s3://``, ``memory://``, ``file://``) with its ``storage_options``."""

    def __init__(
        self,
        location: str | os.PathLike[str],
        name: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        group: str | None = None,
        levels: int | None = None,
    ) -> None:
        """``group``/``levels``: a coarse level, the store's group ``k`` (``level()`` opens them)."""
        from xarray.backends.zarr import ZarrStore

        self._locate(location, name, _local_path(location))
        if storage_options is not None and not _is_url(location):
            raise ValueError(f"storage_options apply to URLs only, not to the path {self.location!r}")
        self._storage_options = storage_options
        options = {"storage_options": dict(storage_options or {})} if _is_url(location) else {}
        try:
            self._store = ZarrStore.open_group(
                self.location, group=group, mode="r", zarr_format=3, consolidated=False, **options
            )
            self._arrays: dict[str, Any] = {}  # opened once: a lookup per block would re-read its metadata
            self._info = self._describe(levels)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(
                f"cannot open store {self.location!r} as a zarr v3 dataset: {exc}"
            ) from exc

    def _describe(self, levels: int | None) -> DatasetInfo:
        variables, coords = {}, {}
        for name, var in self._store.get_variables().items():
            if var.dims == (name,):
                coords[name] = (_objects(np.asarray(var.values)), dict(var.attrs))
                continue
            dtype = np.dtype(var.dtype)
            array = self._arrays[name] = self._store.zarr_group[name]
            variables[name] = VariableInfo(
                name=name,
                dims=tuple(var.dims),
                shape=tuple(var.shape),
                dtype=np.dtype(object) if dtype.kind == "T" else dtype,
                block=tuple(var.encoding["chunks"]),
                attrs=dict(var.attrs),
                stored_tol=_stored_tol(array),
            )
        attrs = dict(self._store.get_attrs())
        ome = attrs.pop(OME, None)
        if levels is None:
            levels = _ome_levels(ome, self.location)
        return DatasetInfo(name=self.name, attrs=attrs, variables=variables, coords=coords, levels=levels)

    def info(self) -> DatasetInfo:
        return self._info

    def _open_level(self, k: int, name: str) -> Origin:
        return ZarrOrigin(self.location, name, self._storage_options, group=str(k), levels=self._info.levels)

    def read_block(self, variable: str, index: BlockIndex) -> np.ndarray:
        var = self._info.variable(variable)
        index = var.grid.check(index)
        try:
            block = self._arrays[variable].get_block_selection(index)
        except Exception as exc:
            raise StoreError(
                f"reading block {index} of {variable!r} from {self.location!r} failed: {exc}"
            ) from exc
        return _objects(np.asarray(block))

    def read_frame(self, variable: str, index: BlockIndex) -> bytes:
        var = self._info.variable(variable)
        if not var.stored_tol:
            return super().read_frame(variable, index)
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        array = self._arrays[variable]
        key = array.metadata.encode_chunk_key(var.grid.check(index))
        try:
            frame = sync(array.store_path.store.get(f"{array.path}/{key}", default_buffer_prototype()))
        except Exception as exc:
            raise StoreError(
                f"reading frame {index} of {variable!r} from {self.location!r} failed: {exc}"
            ) from exc
        if frame is None:
            raise StoreError(f"frame {index} of {variable!r} is missing from {self.location!r}")
        return frame.to_bytes()

    def close(self) -> None:
        super().close()
        self._store.close()


def _stored_tol(array: Any) -> float:
    """The bound of an array stored as tierscope frames alone (``tierscope ingest --tol``), else 0.

    Only a lone tierscope serializer makes each stored chunk a frame that can be sent as it is.
    """
    from tierscope.codec.zarr3 import TierscopeZarrCodec

    codecs = array.metadata.codecs
    if len(codecs) == 1 and isinstance(codecs[0], TierscopeZarrCodec) and codecs[0].tol > 0:
        return codecs[0].tol
    return 0.0


def _ome_levels(ome: Any, location: str) -> int:
    """How many levels the root's OME-Zarr ``multiscales`` lists (1 without them)."""
    if ome is None:
        return 1
    try:
        return len(ome["multiscales"][0]["datasets"])
    except (KeyError, IndexError, TypeError):
        raise StoreError(f"{location!r} has malformed OME-Zarr multiscales metadata: {ome!r}"[:300]) from None


def _objects(values: np.ndarray) -> np.ndarray:
    """zarr's strings (NumPy's ``StringDType``) as ``object`` arrays of ``str``, as the TileDB and
    HDF5 origins give them: one dtype for text whatever the store."""
    return values.astype(object) if values.dtype.kind == "T" else values


def detect_format(location: str | os.PathLike[str]) -> str:
    """Which of ``FORMATS`` a store is: a remote URL is zarr; on disk, a directory with
    ``zarr.json`` is zarr, a TileDB group is tiledb, a file with the HDF5 signature is hdf5.
    A ``sample://`` URL is ``"synthetic"`` (no store: nothing to write, so not one of ``FORMATS``)."""
    if is_synthetic(location):
        return "synthetic"
    path = _local_path(location)
    if path is None:
        return "zarr"
    if not path.exists():
        raise StoreError(f"cannot open store {str(location)!r}: no such file or directory")
    if path.is_dir() and (path / "zarr.json").is_file():
        return "zarr"
    if path.is_dir() and _is_tiledb_group(path):
        return "tiledb"
    if path.is_file() and _has_hdf5_signature(path):
        return "hdf5"
    raise StoreError(
        f"cannot open store {str(location)!r}: expected a zarr v3 store (a directory with zarr.json), "
        "a TileDB group or an HDF5 file"
    )


def _is_tiledb_group(path: Path) -> bool:
    try:
        from tierscope.store.tiledb import is_group
    except ImportError:  # without the tiledb extra: name what is missing when it looks like a group
        if (path / "__tiledb_group.tdb").exists() or (path / "__group").is_dir():
            raise StoreError(f"{str(path)!r} is a TileDB group but the tiledb package is missing: "
                             "pip install 'tierscope[tiledb]'") from None
        return False
    return is_group(path)


def _has_hdf5_signature(path: Path) -> bool:
    """HDF5's superblock signature, at offset 0 or after a user block (512, 1024, 2048, ... bytes)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        offset = 0
        while offset + len(_HDF5_SIGNATURE) <= size:
            file.seek(offset)
            if file.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                return True
            offset = 512 if offset == 0 else offset * 2
    return False


def open_origin(location: str | os.PathLike[str], name: str | None = None) -> Origin:
    """Open a store as an origin, detecting its format (``detect_format``)."""
    fmt = detect_format(location)
    if fmt == "synthetic":
        from tierscope.store.synthetic import SyntheticOrigin

        return SyntheticOrigin(str(location), name=name)
    if fmt == "tiledb":
        from tierscope.store.tiledb import TileDBOrigin

        return TileDBOrigin(location, name=name)
    if fmt == "hdf5":
        try:
            from tierscope.store.hdf5 import HDF5Origin
        except ImportError as exc:
            raise StoreError(f"{str(location)!r} is an HDF5 file but h5py is missing "
                             f"(pip install 'tierscope[hdf5]'): {exc}") from exc
        return HDF5Origin(location, name=name)
    return ZarrOrigin(location, name=name)

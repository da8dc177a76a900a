"""Ingest: convert anything xarray can open into a block-aligned store tierscope can serve: zarr v3,
TileDB or HDF5 (``fmt``), stored chunks = blocks.

The source is opened with ``decode_cf=False`` and written back raw: packed integers stay packed and
every CF attribute (``_FillValue``, ``scale_factor``/``add_offset``, ``units``/``calendar``,
``coordinates``, ``bounds``) is copied as an attribute, so ``xr.open_zarr(out)`` decodes exactly
like ``xr.open_dataset(src)`` and a served block holds the values the simulation wrote, not a
re-encoding. Data stream through dask in pieces that are whole multiples of the block, so memory
stays bounded and parallel writes never share a stored chunk. TileDB and HDF5 get the variables
and attributes exactly as xarray hands them to its zarr writer, so the three origins describe one
ingested dataset identically.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import xarray as xr
from xarray import conventions

from tierscope.errors import StoreError
from tierscope.store.origin import FORMATS, detect_format

__all__ = ["BlockSpec", "ingest", "parse_block_spec"]

BlockSpec = tuple[int, ...] | dict[str, int]
"""Block sizes: one per axis (for variables of that many dimensions), or per dimension name."""

TIME_DIMS = ("time", "t")
"""Dimensions that default to one step per block in a block given by dimension name."""
PIECE_BYTES = 64 * 2**20
"""Largest streamed piece (dask chunk), unless one block is already larger."""

_SIZE = re.compile(r"[0-9]+")
_EXAMPLE = "expected e.g. '1,64,64,64' or 'time=1,z=64,y=64,x=64'"


def parse_block_spec(text: str) -> BlockSpec:
    """Parse a command-line block: ``"1,64,64,64"`` -> tuple, ``"time=1,z=64"`` -> dict."""
    parts = [part.strip() for part in text.split(",")] if text.strip() else []
    if not parts or not all(parts):
        raise ValueError(f"invalid block spec {text!r}: {_EXAMPLE}")
    named = ["=" in part for part in parts]
    if any(named) and not all(named):
        raise ValueError(f"invalid block spec {text!r}: mixes plain sizes and name=size entries")
    if not any(named):
        return tuple(_parse_size(part, text) for part in parts)
    spec: dict[str, int] = {}
    for part in parts:
        name, _, size = (s.strip() for s in part.partition("="))
        if not name or name in spec:
            problem = f"duplicate dimension {name!r}" if name else "empty dimension name"
            raise ValueError(f"invalid block spec {text!r}: {problem}")
        spec[name] = _parse_size(size, text)
    return spec


def _parse_size(raw: str, text: str) -> int:
    if not _SIZE.fullmatch(raw) or int(raw) == 0:
        raise ValueError(f"invalid block spec {text!r}: size {raw!r} is not a positive integer")
    return int(raw)


def _positive_ints(values: Sequence[int], what: str, ndim: int | None = None) -> tuple[int, ...]:
    """A shape-like sequence of positive integers (not bools), of ``ndim`` entries if given."""
    items = tuple(values) if isinstance(values, Sequence) and not isinstance(values, str) else ()
    if not items or not all(_is_int(v) and v > 0 for v in items):
        raise ValueError(f"{what} must be a non-empty sequence of positive ints, got {values!r}")
    if ndim is not None and len(items) != ndim:
        raise ValueError(f"{what} must have {ndim} entries, got {len(items)}: {values!r}")
    return tuple(int(v) for v in items)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def ingest(
    src: str | Path,
    out: str | Path,
    block: BlockSpec,
    fmt: str = "zarr",
    overwrite: bool = False,
) -> Path:
    """Convert ``src`` (netCDF3/4, HDF5, zarr v2/v3) to a ``fmt`` store (zarr v3, TileDB group,
    HDF5 file) chunked by ``block``.

    A tuple block applies to every variable with that many dimensions (others get one chunk); a
    dict names dimensions, and those not named keep their full extent except ``time``/``t`` (1).
    1-D dimension coordinates are always a single chunk. ``overwrite`` replaces an existing store
    (of any of the three formats; anything else at ``out`` is left alone) once the new store is
    complete: the new store is written beside it and renamed into place, so a failed write leaves the
    old store as it was and nothing else behind. Returns the output path."""
    if fmt not in FORMATS:
        raise ValueError(f"output format {fmt!r} is not supported; supported: {', '.join(FORMATS)}")
    block = _check_block(block)
    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    if out.exists() and out.resolve() == src.resolve():
        raise ValueError(f"refusing to overwrite the source {src} with its own ingest")
    if out.exists():
        _check_replaceable(out)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    _delete(partial)  # a leftover of a crashed ingest of this process id
    with _open_raw(src) as ds:
        try:
            _write(_rechunk(ds, block), partial, fmt)
        except BaseException:
            _delete(partial)
            raise
    _delete(out)
    partial.rename(out)
    return out


def _check_replaceable(out: Path) -> None:
    """Only a store is replaced: ``overwrite`` must not delete whatever a typo points at."""
    try:
        detect_format(out)
    except StoreError:
        raise FileExistsError(
            f"{out} exists and is not a zarr, TileDB or HDF5 store; not replacing it"
        ) from None


def _delete(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _write(ds: xr.Dataset, out: Path, fmt: str) -> None:
    if fmt == "zarr":
        ds.to_zarr(out, zarr_format=3, consolidated=False, mode="w-")
        return
    # the variables and attributes xarray's own writers start from: non-index coordinates named
    # in each variable's ``coordinates`` attribute (or the dataset's)
    variables, attrs = conventions.encode_dataset_coordinates(ds)
    if fmt == "tiledb":
        from tierscope.store.tiledb import write_tiledb

        write_tiledb(out, variables, attrs)
    else:
        from tierscope.store.hdf5 import write_hdf5

        write_hdf5(out, variables, attrs)


def _check_block(block: BlockSpec) -> BlockSpec:
    if not isinstance(block, Mapping):
        return _positive_ints(block, "block")
    if not all(isinstance(name, str) and name for name in block):
        raise ValueError(f"block dimension names must be non-empty strings, got {list(block)!r}")
    sizes = _positive_ints(list(block.values()), "block sizes")
    return dict(zip(block, sizes, strict=True))


def _open_raw(src: Path) -> xr.Dataset:
    """Open undecoded; any failure means the input is unreadable, whatever the backend raised."""
    if not src.exists():
        raise StoreError(f"cannot read {src}: no such file or directory")
    # every local zarr store has per-array metadata: skip the consolidated probe and its warning
    options = {"engine": "zarr", "consolidated": False} if src.is_dir() else {}
    try:
        return xr.open_dataset(src, decode_cf=False, **options)
    except Exception as exc:  # backends raise OSError, ValueError, KeyError, zarr errors, ...
        raise StoreError(f"cannot read {src}: {exc}") from exc


def _rechunk(ds: xr.Dataset, block: BlockSpec) -> xr.Dataset:
    """The dataset with its source encodings replaced by the block's zarr chunks."""
    _check_block_applies(ds, block)
    variables = {name: _rechunk_variable(name, var, block) for name, var in ds.variables.items()}
    coords = {name: variables[name] for name in ds.coords}
    data_vars = {name: variables[name] for name in ds.data_vars}
    return xr.Dataset(data_vars, coords=coords, attrs=ds.attrs)


def _check_block_applies(ds: xr.Dataset, block: BlockSpec) -> None:
    """Reject a block that would silently apply to nothing (a typo, or the wrong length)."""
    if isinstance(block, dict):
        unknown = sorted(set(block) - {str(dim) for dim in ds.dims})
        if unknown:
            dims = [str(dim) for dim in ds.dims]
            raise ValueError(f"block names unknown dimension(s) {unknown}; dimensions: {dims}")
    elif not any(var.ndim == len(block) for var in ds.data_vars.values()):
        raise ValueError(f"block {block} has {len(block)} sizes but no variable has as many dims")


def _rechunk_variable(name: Hashable, var: xr.Variable, block: BlockSpec) -> xr.Variable:
    """Only the chunks are kept as encoding: the rest (netCDF ``zlib``/``chunksizes``, zarr v2
    ``compressor``/``filters``, ...) does not apply to zarr v3, and under ``decode_cf=False`` the
    CF keys are attributes already, which xarray copies without applying them again."""
    chunks = _variable_block(name, var, block)
    if var.dtype.kind == "U":  # (small) labels: as objects, zarr v3 stores specified UTF-8
        var = var.astype(object)
    elif name not in var.dims:  # index coordinates stay in memory as pandas indexes
        pieces = _piece(var.shape, chunks, var.dtype.itemsize)
        var = var.chunk(dict(zip(var.dims, pieces, strict=True)))
    var = var.copy(deep=False)
    # _FillValue None: no default NaN fill for floats the source never declared
    var.encoding = {"chunks": chunks, "_FillValue": None}
    return var


def _variable_block(name: Hashable, var: xr.Variable, block: BlockSpec) -> tuple[int, ...]:
    """One variable's zarr chunks: the block clipped to its shape, or its full extent."""
    if var.dims == (name,) or (isinstance(block, tuple) and var.ndim != len(block)):
        sizes = var.shape
    elif isinstance(block, tuple):
        sizes = block
    else:
        dims = zip(var.dims, var.shape, strict=True)
        sizes = tuple(block.get(str(dim), 1 if dim in TIME_DIMS else n) for dim, n in dims)
    return tuple(max(1, min(b, n)) for b, n in zip(sizes, var.shape, strict=True))


def _piece(shape: tuple[int, ...], block: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Dask chunks that are whole multiples of ``block``, grown from the last axis (contiguous in
    netCDF/HDF5) up to ``PIECE_BYTES``: few large reads, and each write covers whole zarr chunks."""
    piece = list(block)
    for axis in reversed(range(len(shape))):
        others = itemsize * math.prod(piece[:axis] + piece[axis + 1 :])
        multiple = max(1, PIECE_BYTES // (others * piece[axis]))
        piece[axis] = max(1, min(shape[axis], piece[axis] * multiple))
        if piece[axis] < shape[axis]:
            break
    return tuple(piece)

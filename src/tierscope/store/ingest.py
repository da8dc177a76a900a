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

With ``levels``, the coarse levels (``tierscope.levels``, ``store/pyramid.py``) are computed from the same
pieces as level 0 and written in the same pass: the source is read once.

Several inputs (paths or glob patterns) are combined by their coordinates, as ``xr.open_mfdataset(...,
combine="by_coords")`` would. The store is written as a hidden ``.NAME.partial-PID`` beside ``out`` and
renamed into place when complete: a failure or an interrupt (KeyboardInterrupt, or any exception the
SIGTERM handler raises) stops the writing threads, removes the partial and leaves ``out`` as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib
import math
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.system import CPU_COUNT
from xarray import conventions

from tierscope.errors import StoreError
from tierscope.store.origin import FORMATS, detect_format
from tierscope.store.zarr_chunks import ChunkTarget, chunk_writer, group_like

__all__ = ["BlockSpec", "ingest", "parse_block_spec"]

BlockSpec = tuple[int, ...] | dict[str, int]
"""Block sizes: one per axis (for variables of that many dimensions), or per dimension name."""

TIME_DIMS = ("time", "t")
"""Dimensions that default to one step per block in a block given by dimension name."""
PIECE_BYTES = 64 * 2**20
"""Largest streamed piece (dask chunk), unless one block is already larger."""
BLOCK_BYTES = 2**20
"""Size a default block aims at (see ``_default_block``): the typical tierscope block."""
CF_ENCODING = ("units", "calendar", "scale_factor", "add_offset", "_FillValue", "missing_value")
"""Raw attributes that several inputs must share: they say what the stored numbers mean."""

Progress = Callable[[int, int], None]
"""``progress(bytes_read, bytes_total)``, called from the writing threads as pieces are read."""

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
    src: str | Path | Sequence[str | Path],
    out: str | Path,
    block: BlockSpec | None = None,
    fmt: str = "zarr",
    overwrite: bool = False,
    progress: Progress | None = None,
    tol: float = 0.0,
    codec: str = "lorenzo",
    levels: int = 0,
) -> Path:
    """Convert ``src`` (netCDF3/4, HDF5, zarr v2/v3; one path, several, or glob patterns) to a ``fmt``
    store (zarr v3, TileDB group, HDF5 file) chunked by ``block``.

    A tuple block applies to every variable with that many dimensions (others get one chunk); a
    dict names dimensions, and those not named keep their full extent except ``time``/``t`` (1).
    ``None`` picks one from the source (``_default_block``). 1-D dimension coordinates are always a
    single chunk. ``overwrite`` replaces an existing store (of any of the three formats; anything else
    at ``out`` is left alone; through a symbolic link, the store it points at) once the new store is
    complete. ``out`` must not be or lie inside a source, and its directory must exist: ingest creates
    no directories. ``progress(bytes_read, bytes_total)`` hears of each piece read. ``levels``: how many
    coarse levels to add beyond level 0, at most as many as fit (``tierscope.levels``).

    ``tol > 0`` writes a pre-encoded zarr store: every floating-point data variable's blocks (at every
    level) are stored as ``codec`` frames within ``tol`` of the values (``_pre_encoded``), so a block
    server hands them out as they are, with no encode, to every view whose tol is at least ``tol``.
    Returns ``out``."""
    from tierscope.store.pyramid import check_count, level_datasets, set_levels  # builds on this module

    if fmt not in FORMATS:
        raise ValueError(f"output format {fmt!r} is not supported; supported: {', '.join(FORMATS)}")
    levels = check_count(levels)
    tol = _check_store_tol(tol, codec, fmt)
    _check_writer(fmt)
    block = None if block is None else _check_block(block)
    sources = _sources(src)
    target = _target(Path(out), sources, overwrite)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    _delete(partial)  # a leftover of a killed ingest of this process id
    with contextlib.ExitStack() as stack:
        datasets = [stack.enter_context(_open_raw(path)) for path in sources]
        data = _prepare(datasets, sources, block, progress)
        coarse = [(str(k), _pre_encoded(ds, tol, codec)) for k, ds in enumerate(level_datasets(data, levels), 1)]
        groups = [("", _pre_encoded(data, tol, codec)), *coarse]
        _write_partial(partial, lambda: write_groups(fmt, partial, groups))
        if coarse:
            set_levels(partial, fmt, data, 1 + len(coarse))
    _commit(partial, target)
    return Path(out)


def _sources(src: str | Path | Sequence[str | Path]) -> list[Path]:
    """The input paths, glob patterns expanded (sorted) where no file has the pattern's own name."""
    entries = [src] if isinstance(src, str | os.PathLike) else list(src)
    if not entries:
        raise ValueError("no input given")
    paths: list[Path] = []
    for entry in map(Path, entries):
        if entry.exists() or not glob.has_magic(str(entry)):
            paths.append(entry)
            continue
        matches = sorted(glob.glob(str(entry)))
        if not matches:
            raise StoreError(f"cannot read {entry}: no file matches the pattern")
        paths.extend(map(Path, matches))
    return paths


def _target(out: Path, sources: list[Path], overwrite: bool) -> Path:
    """Where the store goes, once everything ingest must refuse is refused. A symbolic link keeps
    pointing where it did, and the store there is what gets replaced (a rename over the link would
    replace the link itself and leave the old store behind)."""
    if out.is_symlink() and not out.exists():
        raise StoreError(f"cannot write {out}: it is a broken symbolic link")
    target = out.resolve() if out.is_symlink() else out
    if target.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    _check_not_source(target, sources)
    if target.exists():
        _check_replaceable(target)
    _check_directory(target)
    return target


def _check_not_source(target: Path, sources: list[Path]) -> None:
    """Writing at, inside or (replacing) around a source would corrupt the data being read."""
    where = target.resolve()
    for src in map(Path.resolve, sources):
        if where == src:
            raise ValueError(f"refusing to overwrite the source {src} with its own ingest")
        if where.is_relative_to(src):
            raise ValueError(f"refusing to write {target} inside the source store {src}")
        if src.is_relative_to(where):
            raise ValueError(f"refusing to replace {target}: it holds the source {src}")


def _check_directory(target: Path) -> None:
    """Fail before the long read, not after it; and create no directories (a typo in a path must not
    grow a tree of them)."""
    parent = target.parent
    if not parent.is_dir():
        raise StoreError(f"cannot write {target}: {parent} is not an existing directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"cannot write {target}: directory {parent} is not writable")


def _check_replaceable(out: Path) -> None:
    """Only a store is replaced: ``overwrite`` must not delete whatever a typo points at."""
    try:
        detect_format(out)
    except StoreError:
        raise FileExistsError(
            f"{out} exists and is not a zarr, TileDB or HDF5 store; not replacing it"
        ) from None


def _prepare(
    datasets: list[xr.Dataset], sources: list[Path], block: BlockSpec | None, progress: Progress | None
) -> xr.Dataset:
    """The dataset to write: inputs combined, chunked by the block, pieces counted for ``progress``."""
    block = _default_block(datasets[0]) if block is None else block
    data = _combine(datasets, sources, block) if len(datasets) > 1 else datasets[0]
    data = _rechunk(data, block)
    return data if progress is None else _counted(data, progress)


def _check_store_tol(tol: float, codec: str, fmt: str) -> float:
    from tierscope.codec import get_codec
    from tierscope.metadata import check_tol

    tol = check_tol(tol)
    if tol and fmt != "zarr":
        raise ValueError(f"--tol writes pre-encoded zarr stores only, not --format {fmt}")
    if tol:
        get_codec(codec)  # names the known codecs
    return tol


def _pre_encoded(ds: xr.Dataset, tol: float, codec: str) -> xr.Dataset:
    """With ``tol``: each floating-point data variable's chunks stored as one tierscope frame each."""
    if not tol:
        return ds
    from tierscope.codec.zarr3 import TierscopeZarrCodec

    ds = ds.copy()
    for var in ds.data_vars.values():
        if var.dtype.kind == "f":
            var.encoding = {**var.encoding, "serializer": TierscopeZarrCodec(codec=codec, tol=tol),
                            "compressors": None}
    return ds


def _write_partial(partial: Path, write: Callable[[], None]) -> None:
    """Run ``write`` on a thread pool of our own: on a failure or an interrupt, the pieces being written
    finish, the queued ones are dropped, and only then is the partial removed (a thread still writing
    would refill it, and removing it would fail with "Directory not empty")."""
    pool = ThreadPoolExecutor(CPU_COUNT, thread_name_prefix="tierscope-ingest")
    try:
        with dask.config.set(scheduler="threads", pool=pool):
            write()
    except BaseException:
        with _signals_held():
            pool.shutdown(wait=True, cancel_futures=True)
            _delete(partial)
        raise
    finally:
        pool.shutdown()


def _commit(partial: Path, target: Path) -> None:
    """Put the complete store in place: the old store moves aside, the new one takes its name, the old
    one goes. Signals wait meanwhile, so ``target`` never lacks a whole store."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    with _signals_held():
        if target.exists():
            target.rename(old)
        partial.rename(target)
        _delete(old)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while a step that must not stop half way runs, then deliver them.
    Handlers belong to the main thread: elsewhere nothing is held (nor can a signal arrive there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, _: held.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if held:
            signal.raise_signal(held[0])


def _delete(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_groups(fmt: str, out: Path, groups: Sequence[tuple[str, xr.Dataset]]) -> None:
    """Write raw datasets into one store in one dask pass: the name ``""`` is the store ``out`` itself
    (new), ``"k"`` its group ``k`` (zarr, TileDB: the directory ``out/k``; HDF5: the group ``/k``)."""
    if fmt == "zarr":
        _write_zarr(out, groups)
        return
    # the variables and attributes xarray's own writers start from: non-index coordinates named
    # in each variable's ``coordinates`` attribute (or the dataset's)
    encoded = [(name, *conventions.encode_dataset_coordinates(ds)) for name, ds in groups]
    if fmt == "tiledb":
        from tierscope.store.tiledb import write_tiledb

        write_tiledb([(out / name if name else out, {key: _merged(var) for key, var in variables.items()},
                       attrs) for name, variables, attrs in encoded])
    else:
        from tierscope.store.hdf5 import write_hdf5

        write_hdf5(out, encoded, mode="a" if out.exists() else "w-")


def _merged(var: xr.Variable) -> xr.Variable:
    """A streamed variable in pieces grown to ``PIECE_BYTES`` from whole pieces: a coarse level's pieces
    are a fraction of level 0's, and each TileDB write makes a fragment (a directory of files)."""
    if not isinstance(var.data, da.Array):
        return var
    piece = _piece(var.shape, tuple(max(sizes) for sizes in var.data.chunks), var.dtype.itemsize)
    return var.copy(data=var.data.rechunk(piece), deep=False)


def _write_zarr(out: Path, groups: Sequence[tuple[str, xr.Dataset]]) -> None:
    """xarray writes the first group's layout, attributes and in-memory variables; a group xarray would
    store alike but for its arrays' shapes and chunks (a coarse level beside level 0) is laid out from the
    first group's zarr documents (``zarr_chunks.group_like``), any other by xarray too. The streamed
    variables (encoded as xarray would) go through one ``da.store``, so every level reads the same pieces.
    The first group (the store) is laid out first, here; the others by a thread of their own while the
    pieces are read: a group's first write waits for its layout. The first layout also imports, in this
    thread, what laying out needs (dask's graph code imports ``distributed``): two threads importing one
    package at once can fail."""
    encoded = [_encoded(ds) for _, ds in groups]
    streamed = [{key: var.data for key, var in variables.items() if isinstance(var.data, da.Array)}
                for variables, _ in encoded]
    model = out / groups[0][0] if groups[0][0] else out
    layouts = ThreadPoolExecutor(1, thread_name_prefix="tierscope-layout")
    try:
        # zarr writes a layout from its own event loop thread, which an interrupt of this thread does
        # not stop: it would keep adding files to the partial being removed ("Directory not empty")
        with _signals_held():
            first: Future[dict[str, ChunkTarget]] = Future()
            first.set_result(_layout(out, *groups[0], streamed[0]))
        arrays = [first, *(layouts.submit(_layout_like, model, encoded[0], out, name, ds, group)
                           for (name, ds), group in zip(groups[1:], encoded[1:], strict=True))]
        sources = [data for variables in streamed for data in variables.values()]
        targets = [_Pending(group, key) for group, keys in zip(arrays, streamed, strict=True) for key in keys]
        if sources:  # pieces are whole chunks: no two tasks write one chunk
            da.store(sources, targets, lock=False)
        for group in arrays:
            group.result()  # a layout that failed, even where nothing waited for it
    finally:
        with _signals_held():  # nor may the layouts' thread, for the same reason
            layouts.shutdown(cancel_futures=True)


Encoded = tuple[dict[str, xr.Variable], dict[Hashable, object]]
"""A group's variables as xarray's zarr writer encodes them, and its attributes."""


def _encoded(ds: xr.Dataset) -> Encoded:
    from tierscope._compat import encode_zarr_variable

    variables, attrs = conventions.encode_dataset_coordinates(ds)
    encoded = {str(key): encode_zarr_variable(var, name=key, zarr_format=3) for key, var in variables.items()}
    return encoded, attrs


_CONFIG = {"write_empty_chunks": True}
"""How ingest's zarr arrays are written (see ``_layout``)."""


def _layout(out: Path, name: str, ds: xr.Dataset, streamed: Iterable[str]) -> dict[str, ChunkTarget]:
    """Write a group's layout; return targets for its ``streamed`` zarr arrays by name, which write every
    chunk in the writing thread (``zarr_chunks``). Where zarr writes them, every chunk too: it otherwise
    compares each chunk with the fill value first (to leave it out), a pass over the chunk on zarr's one
    event-loop thread, which all of an ingest's reads and writes share."""
    import zarr

    path = out / name if name else out
    ds.to_zarr(path, zarr_format=3, consolidated=False, mode="w-", compute=False)
    group = zarr.open_group(path, mode="r+", zarr_format=3)
    return {key: chunk_writer(group[key].with_config(_CONFIG)) for key in streamed}


def _layout_like(model: Path, like: Encoded, out: Path, name: str, ds: xr.Dataset,
                 encoded: Encoded) -> dict[str, ChunkTarget]:
    """``_layout``, from the zarr documents of ``model`` (the group xarray wrote from ``like``) where xarray
    would store ``encoded`` alike but for its arrays' shapes and chunks; its in-memory values written."""
    variables, _ = encoded
    streamed = [key for key, var in variables.items() if isinstance(var.data, da.Array)]
    if not _alike(like, encoded):
        return _layout(out, name, ds, streamed)
    arrays = group_like(model, out / name, {key: (var.shape, var.encoding["chunks"])
                                            for key, var in variables.items()}, _CONFIG)
    targets: dict[str, ChunkTarget] = {}
    for key, var in variables.items():
        target = chunk_writer(arrays[key])
        if key in streamed:
            targets[key] = target
        else:  # coordinates, labels: small, in memory
            target[(slice(None),) * var.ndim] = np.asarray(var.data)
    return targets


def _alike(like: Encoded, other: Encoded) -> bool:
    """Whether xarray stores two groups' encoded variables alike but for their shapes and chunks: the same
    names, dimensions, dtypes, attributes and encodings (the chunks aside, given per axis)."""
    (first, first_attrs), (then, then_attrs) = like, other
    return first.keys() == then.keys() and _same(first_attrs, then_attrs) and all(
        _same_variable(first[key], then[key]) for key in first)


def _same_variable(a: xr.Variable, b: xr.Variable) -> bool:
    def rest(var: xr.Variable) -> dict[Hashable, object]:
        return {key: value for key, value in var.encoding.items() if key != "chunks"}

    return (a.dims == b.dims and a.dtype == b.dtype
            and all(len(var.encoding.get("chunks", (None,))) == var.ndim for var in (a, b))
            and _same(a.attrs, b.attrs) and _same(rest(a), rest(b)))


def _same(a: Mapping[Hashable, object], b: Mapping[Hashable, object]) -> bool:
    return a.keys() == b.keys() and all(_equal(a[key], b[key]) for key in a)


def _equal(x: object, y: object) -> bool:
    """The same object, or equal values of one type: numbers, strings, arrays of them, codecs."""
    if x is y:
        return True
    if type(x) is not type(y):
        return False
    if dataclasses.is_dataclass(x):
        return x == y
    return isinstance(x, str | bytes | int | float | tuple | list | np.generic | np.ndarray) and bool(
        np.array_equal(x, y))


class _Pending:
    """A ``da.store`` target: a zarr array's chunk target, which another thread may still be laying out."""

    def __init__(self, group: Future[dict[str, ChunkTarget]], key: str) -> None:
        self._group, self._key = group, key

    def __setitem__(self, region: tuple[slice, ...], values: np.ndarray) -> None:
        self._group.result()[self._key][region] = values


def _check_writer(fmt: str) -> None:
    """Before reading anything: the package the format's writer needs is installed."""
    module = {"tiledb": "tierscope.store.tiledb", "hdf5": "tierscope.store.hdf5"}.get(fmt)
    if module is None:
        return
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"--format {fmt} needs the {fmt} extra ({exc}): pip install 'tierscope[{fmt}]'") from None


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


def _default_block(ds: xr.Dataset) -> dict[str, int]:
    """The block when none is given, from the largest data variable (most dimensions, then bytes):
    ``time``/``t`` 1, every other dimension the source's chunk (its full length if unchunked); then,
    while a block exceeds ``BLOCK_BYTES``, the largest size is halved, and while doubling the smallest
    still fits, it is doubled (up to the dimension's length). Halving and doubling keep blocks aligned to
    the source's chunks, so a block read never straddles two of them where it can be avoided."""
    var = max(ds.data_vars.values(), key=lambda v: (v.ndim, v.nbytes), default=None)
    if var is None or var.ndim == 0:
        return {}
    lengths = {str(dim): n for dim, n in var.sizes.items()}
    chunks = var.encoding.get("preferred_chunks", {})
    sizes = {dim: 1 if dim in TIME_DIMS else min(chunks.get(dim, n), n) for dim, n in lengths.items()}
    space = [dim for dim in sizes if dim not in TIME_DIMS]

    def nbytes(extra: int = 1) -> int:
        return var.dtype.itemsize * math.prod(sizes.values()) * extra

    while space and nbytes() > BLOCK_BYTES and max(sizes[d] for d in space) > 1:
        dim = max(space, key=sizes.__getitem__)
        sizes[dim] = -(-sizes[dim] // 2)
    while growable := [d for d in space if sizes[d] < lengths[d] and nbytes(2) <= BLOCK_BYTES]:
        dim = min(growable, key=sizes.__getitem__)
        sizes[dim] = min(2 * sizes[dim], lengths[dim])
    return sizes


def _combine(datasets: list[xr.Dataset], sources: list[Path], block: BlockSpec) -> xr.Dataset:
    """Several inputs as one dataset, combined by their coordinates as ``xr.open_mfdataset(...,
    combine="by_coords")`` does. Each is chunked first (xarray would load plain backend arrays to
    concatenate them); variables without the combined dimension come from the first input, and the
    other coordinates must match exactly."""
    _check_same_encoding(datasets, sources)
    try:
        return xr.combine_by_coords(
            [_rechunk(ds, block) for ds in datasets], data_vars="minimal", coords="minimal",
            compat="override", join="exact", combine_attrs="drop_conflicts",
        )
    except ValueError as exc:
        raise ValueError(f"cannot combine the inputs by their coordinates: {exc}") from None


def _check_same_encoding(datasets: list[xr.Dataset], sources: list[Path]) -> None:
    """Values are combined raw: inputs that encode a variable differently (time in ``hours since``
    another epoch, another ``scale_factor``) would silently mix meanings."""
    first = datasets[0]
    for ds, src in zip(datasets[1:], sources[1:], strict=True):
        for name in set(first.variables) & set(ds.variables):
            for key in CF_ENCODING:
                a, b = first[name].attrs.get(key), ds[name].attrs.get(key)
                if not _same(a, b):
                    raise ValueError(f"{sources[0]} and {src} encode {name!r} differently ({key} {a!r} "
                                     f"vs {b!r}); ingest them separately")


def _same(a: object, b: object) -> bool:
    try:
        return bool(np.array_equal(a, b, equal_nan=True))
    except TypeError:  # not numbers: no NaN to worry about
        return a == b


def _rechunk(ds: xr.Dataset, block: BlockSpec) -> xr.Dataset:
    """The dataset with its source encodings replaced by the block's zarr chunks."""
    _check_block_applies(ds, block)
    return _map_variables(ds, lambda name, var: _rechunk_variable(name, var, block))


def _counted(ds: xr.Dataset, progress: Progress) -> xr.Dataset:
    """The dataset with every streamed piece counted as it is read: one count for all three formats."""
    streamed = [var for var in ds.variables.values() if isinstance(var.data, da.Array)]
    counter = _Counter(sum(var.nbytes for var in streamed), progress)

    def count(name: Hashable, var: xr.Variable) -> xr.Variable:
        if not isinstance(var.data, da.Array):
            return var
        data = var.data.map_blocks(counter.tick, dtype=var.dtype, meta=var.data._meta,
                                   name=f"{var.data.name}-counted")
        return var.copy(deep=False, data=data)

    return _map_variables(ds, count)


class _Counter:
    """Bytes read so far, reported on each piece; ``tick`` runs in the writing threads."""

    def __init__(self, total: int, progress: Progress) -> None:
        self._total, self._progress = total, progress
        self._done = 0
        self._lock = threading.Lock()

    def tick(self, piece: np.ndarray) -> np.ndarray:
        with self._lock:
            self._done += piece.nbytes
            self._progress(self._done, self._total)
        return piece


def _map_variables(
    ds: xr.Dataset, change: Callable[[Hashable, xr.Variable], xr.Variable]
) -> xr.Dataset:
    variables = {name: change(name, var) for name, var in ds.variables.items()}
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
    if var.dtype.kind in "UO":  # (small) labels, in memory: as objects, zarr v3 stores specified UTF-8
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

"""Each served dataset as a plain zarr v3 hierarchy over HTTP, for readers without tierscope.

    zarr.open_group("http://host:8765/zarr/turb", mode="r")
    xr.open_zarr("http://host:8765/zarr/turb")               # level 0; group="1" for level 1

Layout of ``/zarr/{name}/``: the root group is level 0 (the dataset's attributes plus OME-Zarr 0.5
``multiscales``), with one array per variable and per dimension coordinate; level k >= 1 is the subgroup
``k/`` with the same arrays on its coarser grid: the service's dataset ``NAME@k``, for every level
``DatasetInfo.levels`` counts (a store's stored levels, a ``sample://`` dataset's computed ones). Every
group's ``zarr.json`` carries zarr-python's inline consolidated metadata, so a reader needs no directory
listing (plain HTTP has none).

One chunk is one block, lossless: the raw block from L4 or the origin (``BlockService.raw_block``),
padded to the full chunk shape at the array's edges (zarr chunks are always full-size), C-order bytes in
their own byte order (``bytes`` codec; text as ``vlen-utf8``), then ``zstd``, on the service's user
pool. A dimension coordinate is one chunk, from the dataset's description (compressed in a thread).
Values and attributes are raw, as stored, with ``_FillValue`` in xarray's zarr v3 form, so xarray's CF
decoding gives what ``xr.open_zarr`` gives on the store itself (a datetime coordinate is its stored
integers with ``units``/``calendar``).

HTTP: ``ETag`` on everything, ``If-None-Match`` answered 304 before any block is read; chunks are
immutable (``Cache-Control: public, max-age=31536000, immutable``), ``zarr.json`` documents are kept
``max-age=60``; CORS for browsers (``Access-Control-Allow-Origin: *``, an ``OPTIONS`` preflight). Any
other key (``.zgroup``, ``.zattrs``, an index out of range) is a JSON 404, which zarr reads as "absent".
The event loop does only constant work per request: the documents of a dataset are built once, in a
thread, and padding and compression run on the service's pool.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import zstandard
from aiohttp import web

from tierscope.errors import DatasetNotFoundError, VariableNotFoundError
from tierscope.grid import BlockGrid, BlockIndex
from tierscope.levels import layouts, level_name, spatial_dims, split_level, windows
from tierscope.metadata import DatasetInfo, jsonable
from tierscope.server.limits import ByteBudget, stream
from tierscope.server.service import BlockService

__all__ = ["CHUNK_CACHE_CONTROL", "METADATA_CACHE_CONTROL", "ZSTD_LEVEL", "add_zarr_routes", "encode_chunk"]

logger = logging.getLogger(__name__)

ZSTD_LEVEL = 1  # the server compresses every chunk it sends: the cheapest level (readers do not care)
CHUNK_CACHE_CONTROL = "public, max-age=31536000, immutable"
METADATA_CACHE_CONTROL = "public, max-age=60"
_CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "ETag, X-Tierscope-Tier"}
_PREFLIGHT = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, If-None-Match, Range",
    "Access-Control-Max-Age": "86400",
}
_MAX_INDEX_DIGITS = 9
_OME_UNITS = {  # CF-style unit abbreviations -> OME-Zarr unit names (units outside OME's list are left out)
    "s": "second", "sec": "second", "second": "second", "seconds": "second", "ms": "millisecond",
    "millisecond": "millisecond", "milliseconds": "millisecond", "min": "minute", "minute": "minute",
    "minutes": "minute", "h": "hour", "hour": "hour", "hours": "hour", "d": "day", "day": "day",
    "days": "day", "m": "meter", "meter": "meter", "meters": "meter", "metre": "meter", "km": "kilometer",
    "cm": "centimeter", "mm": "millimeter", "um": "micrometer", "nm": "nanometer",
}


@dataclass(frozen=True)
class _Array:
    """One array of the hierarchy: where its chunks come from and how they are padded."""

    dataset: str  # the service's name of its level: NAME or NAME@k
    name: str
    dtype: np.dtype
    grid: BlockGrid
    fill: Any
    coord: np.ndarray | None = None  # a dimension coordinate's values: one chunk, from memory

    @property
    def chunk_nbytes(self) -> int:
        return math.prod(self.grid.block) * self.dtype.itemsize


@dataclass(frozen=True)
class _Hierarchy:
    """A dataset's zarr view: ``zarr.json`` documents and arrays by key, and what its chunk ETags hash."""

    identity: bytes
    documents: dict[str, tuple[bytes, str]]  # "zarr.json", "u/zarr.json", "1/zarr.json", ... -> (body, ETag)
    arrays: dict[str, _Array]  # "u", "time", "1/u", ...


@dataclass
class _State:
    service: BlockService
    budget: ByteBudget
    hierarchies: dict[str, asyncio.Task[_Hierarchy]]  # by dataset name: built once, shared while building


STATE = web.AppKey("zarr_http", _State)
routes = web.RouteTableDef()


# ---------------------------------------------------------------------------------------- encoding
def _encoding(dtype: np.dtype) -> tuple[Any, list[dict[str, Any]], Any]:
    """A NumPy dtype as zarr v3 (as zarr-python and xarray write it): ``data_type``, ``codecs`` and the
    chunk padding value.

    The padding value is also the array's ``fill_value``: NaN for floats, 0, false or "" otherwise, what
    xarray writes by default, so readers that use ``fill_value`` as a mask see what the store gives them.
    """
    compressor = {"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": False}}
    if dtype.kind == "O":  # text as str objects
        return "string", [{"name": "vlen-utf8", "configuration": {}}, compressor], ""
    if dtype.kind not in "biufcU":
        raise ValueError(f"dtype {dtype} has no zarr v3 data type here")
    if dtype.itemsize == 1:
        serializer: dict[str, Any] = {"name": "bytes", "configuration": {}}
    else:
        big = dtype.byteorder == ">" or (dtype.byteorder == "=" and not np.little_endian)
        serializer = {"name": "bytes", "configuration": {"endian": "big" if big else "little"}}
    if dtype.kind == "U":  # fixed-width text: zarr-python's extension type, what xarray writes for <U
        data_type: Any = {"name": "fixed_length_utf32", "configuration": {"length_bytes": dtype.itemsize}}
        return data_type, [serializer, compressor], ""
    fill = {"b": False, "i": 0, "u": 0}.get(dtype.kind, np.nan)
    return dtype.name, [serializer, compressor], fill  # a dtype's name leaves out its byte order


def _fill_json(fill: Any, dtype: np.dtype) -> Any:
    """A fill value as zarr v3 JSON: NaN is the string "NaN", a complex one a pair."""
    if dtype.kind == "c":
        return ["NaN", "NaN"]
    if isinstance(fill, float) and math.isnan(fill):
        return "NaN"
    return fill


def _fill_value_attr(value: Any, dtype: np.dtype) -> Any:
    """A ``_FillValue`` attribute in xarray's zarr v3 form (``FillValueCoder.encode``): a float as the
    base64 of its little-endian float64 bytes, an integer as a number, text as itself."""
    if dtype.kind == "f":
        return base64.standard_b64encode(struct.pack("<d", float(value))).decode()
    if dtype.kind == "c":
        value = complex(value)
        return [base64.standard_b64encode(struct.pack("<d", part)).decode()
                for part in (value.real, value.imag)]
    if dtype.kind in "iu":
        return int(value)
    if dtype.kind == "b":
        return bool(value)
    return str(value)


def _attributes(attrs: Mapping[str, Any], dtype: np.dtype) -> dict[str, Any]:
    out = jsonable(dict(attrs))
    if out.get("_FillValue") is not None:
        out["_FillValue"] = _fill_value_attr(attrs["_FillValue"], dtype)
    return out


def encode_chunk(block: np.ndarray, chunk_shape: Sequence[int], fill: Any) -> bytes:
    """A block as one zarr chunk: padded to ``chunk_shape`` with ``fill`` where the array's edge cuts it,
    C-order bytes in the block's byte order (``vlen-utf8`` for text), zstd-compressed."""
    chunk_shape = tuple(chunk_shape)
    if block.shape != chunk_shape:
        full = np.full(chunk_shape, fill, dtype=block.dtype)
        full[tuple(slice(0, n) for n in block.shape)] = block
        block = full
    if block.dtype.kind == "O":
        from numcodecs import VLenUTF8  # zarr's own dependency

        payload: Any = VLenUTF8().encode(block)
    else:
        payload = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(payload)


# ---------------------------------------------------------------------------------------- documents
def _array_document(dtype: np.dtype, shape: Sequence[int], chunks: Sequence[int], dims: Sequence[str],
                    attrs: Mapping[str, Any]) -> dict[str, Any]:
    data_type, codecs, fill = _encoding(dtype)
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": data_type,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": _fill_json(fill, dtype),
        "codecs": codecs,
        "attributes": _attributes(attrs, dtype),
        "dimension_names": list(dims),
    }


def _group_document(attrs: Mapping[str, Any],
                    children: Mapping[str, dict[str, Any]] | None) -> dict[str, Any]:
    """A group; with ``children``, zarr-python's inline consolidated metadata: every node below it, by
    relative path (a subgroup listed there has none of its own: zarr-python nests them)."""
    document: dict[str, Any] = {"zarr_format": 3, "node_type": "group", "attributes": jsonable(dict(attrs))}
    if children is not None:
        document["consolidated_metadata"] = {"kind": "inline", "must_understand": False,
                                             "metadata": dict(children)}
    return document


def _level_arrays(k: int, dataset: str, info: DatasetInfo) -> tuple[dict[str, _Array], dict[str, dict]]:
    """One level's arrays and their documents, keyed by path (``u`` at level 0, ``1/u`` at level 1)."""
    prefix = "" if k == 0 else f"{k}/"
    arrays: dict[str, _Array] = {}
    documents: dict[str, dict] = {}
    for name, (values, attrs) in info.coords.items():
        values = np.asarray(values)
        try:
            document = _array_document(values.dtype, values.shape, (max(1, len(values)),), (name,), attrs)
        except ValueError as exc:
            logger.warning("%s: coordinate %r left out of the zarr view: %s", dataset, name, exc)
            continue
        arrays[prefix + name] = _Array(dataset, name, values.dtype, BlockGrid(values.shape,
                                       (max(1, len(values)),)), _encoding(values.dtype)[2], values)
        documents[prefix + name] = document
    for var in info.variables.values():
        try:
            document = _array_document(var.dtype, var.shape, var.block, var.dims, var.attrs)
        except ValueError as exc:
            logger.warning("%s: variable %r left out of the zarr view: %s", dataset, var.name, exc)
            continue
        arrays[prefix + var.name] = _Array(dataset, var.name, var.dtype, var.grid, _encoding(var.dtype)[2])
        documents[prefix + var.name] = document
    return arrays, documents


def _ome_unit(attrs: Mapping[str, Any]) -> str | None:
    units = attrs.get("units")
    if not isinstance(units, str):
        return None
    return _OME_UNITS.get(units.split(" since ")[0].strip().lower())


def _numeric(values: np.ndarray | None) -> np.ndarray | None:
    if values is None:
        return None
    values = np.asarray(values)
    if values.dtype.kind not in "iuf" or not np.isfinite(values.astype(np.float64)).all():
        return None
    return values.astype(np.float64)


def _scale_translation(c0: np.ndarray | None, ck: np.ndarray | None, window: int) -> tuple[float, float]:
    """One axis of level k's transform: level 0's step times the level's window (``tierscope.levels``; a
    step read off level k's coordinate is skewed where its last value averages a partial far-edge
    window) and level k's first coordinate; in level-0 pixels (window centres) without coordinates."""
    c0, ck = _numeric(c0), _numeric(ck)
    step0 = float(c0[1] - c0[0]) if c0 is not None and len(c0) >= 2 else 1.0
    if ck is not None and len(ck):
        return step0 * window, float(ck[0])
    start = float(c0[0]) if c0 is not None and len(c0) else 0.0
    return step0 * window, start + (window - 1) / 2 * step0


def _coord(info: DatasetInfo, dim: str) -> np.ndarray | None:
    return info.coords[dim][0] if dim in info.coords else None


def _multiscales(levels: Sequence[DatasetInfo]) -> list[dict[str, Any]]:
    """OME-Zarr 0.5 ``multiscales``: one entry per data variable that is an OME image (2 to 5 axes, the
    time axis first if any, 2 or 3 space axes); others stay plain arrays of the hierarchy."""
    base = levels[0]
    spatial = spatial_dims(layouts(base))
    entries = []
    for var in base.variables.values():
        time_axis = var.time_axis
        spaces = len(var.dims) - (time_axis is not None)
        if time_axis not in (None, 0) or not 2 <= spaces <= 3:
            continue
        axes = []
        for i, dim in enumerate(var.dims):
            axis = {"name": dim, "type": "time" if i == time_axis else "space"}
            unit = _ome_unit(base.coords[dim][1]) if dim in base.coords else None
            if unit is not None:
                axis["unit"] = unit
            axes.append(axis)
        datasets = []
        for k, info in enumerate(levels):
            if var.name not in info.variables:
                break
            coarsened = windows(var.dims, var.shape, spatial, k)
            transforms = [_scale_translation(_coord(base, dim), _coord(info, dim), coarsened.get(axis, 1))
                          for axis, dim in enumerate(var.dims)]
            datasets.append({
                "path": ("" if k == 0 else f"{k}/") + var.name,
                "coordinateTransformations": [
                    {"type": "scale", "scale": [s for s, _ in transforms]},
                    {"type": "translation", "translation": [t for _, t in transforms]},
                ],
            })
        kind = "mean" if var.dtype.kind in "fc" else "nearest"  # how levels coarsen it (tierscope.levels)
        entries.append({"name": var.name, "axes": axes, "datasets": datasets, "type": kind})
    return entries


def _etag(*parts: bytes) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return f'"{digest.hexdigest()}"'


def _dumps(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def build_hierarchy(name: str, levels: Sequence[tuple[str, DatasetInfo]], stamp: str) -> _Hierarchy:
    """Every document and array of a dataset's zarr view (in a thread: coordinates are hashed).

    ``levels``: ``(service dataset name, info)`` for level 0, 1, ...; ``stamp`` says which contents of
    the store these are, so chunk ETags change when the store is rewritten.
    """
    arrays: dict[str, _Array] = {}
    nodes: dict[str, dict] = {}  # every node below the root, by path
    for k, (dataset, info) in enumerate(levels):
        level_arrays, documents = _level_arrays(k, dataset, info)
        if k:
            nodes[str(k)] = _group_document(info.attrs, None)
        arrays.update(level_arrays)
        nodes.update(documents)
    infos = [info for _, info in levels]
    root_attrs = {**infos[0].attrs, "ome": {"version": "0.5", "multiscales": _multiscales(infos)}}
    bodies = {"zarr.json": _dumps(_group_document(root_attrs, nodes))}
    for path, node in nodes.items():
        if node["node_type"] == "group":
            below = {p[len(path) + 1:]: n for p, n in nodes.items() if p.startswith(path + "/")}
            node = _group_document(node["attributes"], below)
        bodies[f"{path}/zarr.json"] = _dumps(node)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{name}\n{stamp}\n".encode())
    digest.update(bodies["zarr.json"])
    for array in arrays.values():
        if array.coord is not None:
            digest.update(array.coord.tobytes() if array.coord.dtype.kind != "O"
                          else "\0".join(map(str, array.coord.tolist())).encode())
    identity = digest.digest()
    documents = {key: (body, _etag(identity, body)) for key, body in bodies.items()}
    return _Hierarchy(identity, documents, arrays)


def _store_stamp(service: BlockService, name: str) -> str:
    """Which contents of the store are served: its kind, location and, for a local store, the identity
    and times of its root and root ``zarr.json`` (a rewrite by ``tierscope ingest`` changes them)."""
    origin = service.origin(name)
    parts = [type(origin).__name__, origin.location]
    if origin.path is not None:
        for path in (origin.path, origin.path / "zarr.json"):
            try:
                st = path.stat()
            except OSError:
                continue
            parts.append(f"{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}")
    return "|".join(parts)


def _describe(service: BlockService, name: str) -> _Hierarchy:
    """Build a dataset's view (in a thread): its levels' descriptions (level k is the service's
    dataset ``NAME@k``, stored or computed by the origin), then every document."""
    levels = [(level_name(name, k), service.info(level_name(name, k)))
              for k in range(service.info(name).levels)]
    return build_hierarchy(name, levels, _store_stamp(service, name))


async def _hierarchy(request: web.Request, name: str) -> _Hierarchy:
    state = request.app[STATE]
    task = state.hierarchies.get(name)
    if task is None:
        service = state.service
        base, level = split_level(name)
        if base != name and base in service.datasets() and name not in service.datasets():
            raise DatasetNotFoundError(f"{name!r} is level {level} of {base!r}: zarr readers find it at "
                                       f"/zarr/{base}/{f'{level}/' if level else ''}")
        service.origin(name)  # DatasetNotFoundError for a name not served
        task = state.hierarchies[name] = asyncio.ensure_future(asyncio.to_thread(_describe, service, name))
    try:
        return await asyncio.shield(task)
    except Exception:
        if state.hierarchies.get(name) is task:
            del state.hierarchies[name]  # not cached: the next request tries again
        raise


# ---------------------------------------------------------------------------------------- routes
def _not_found(message: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=message)


def _not_modified(request: web.Request, etag: str) -> bool:
    header = request.headers.get("If-None-Match")
    if header is None:
        return False
    tags = [tag.strip() for tag in header.split(",")]
    return "*" in tags or any(tag.removeprefix("W/") == etag for tag in tags)


def _locate(hierarchy: _Hierarchy, name: str, key: str) -> tuple[_Array, BlockIndex]:
    """The array and chunk index of a chunk key like ``u/c/0/1/2/3`` or ``1/u/c/0/0/1/1``; 404 otherwise."""
    parts = key.split("/")
    for i in (1, 2):
        if len(parts) > i and parts[i] == "c":
            array = hierarchy.arrays.get("/".join(parts[:i]))
            if array is not None:
                break
    else:
        for i in (1, 2):
            if len(parts) > i and parts[i] == "c":  # VAR/c/... or LEVEL/VAR/c/...
                raise VariableNotFoundError(f"dataset {name!r} has no array "
                                            f"{'/'.join(parts[:i])[:100]!r} in its zarr view")
        raise _not_found(f"no zarr key {key[:200]!r} in /zarr/{name}: expected zarr.json, "
                         "VAR/zarr.json, VAR/c/I/J/..., or LEVEL/... for a level")
    indices = parts[i + 1:]
    if len(indices) > array.grid.ndim or not all(
        p.isascii() and p.isdigit() and len(p) <= _MAX_INDEX_DIGITS for p in indices
    ):
        raise _not_found(f"malformed chunk key {key[:200]!r}: expected {parts[i - 1]}/c/ followed by "
                         f"{array.grid.ndim} integers separated by '/'")
    return array, array.grid.check(tuple(int(p) for p in indices))  # BlockIndexError: a 404 too


@routes.get("/zarr/{name}/{key:.+}")
async def zarr_key(request: web.Request) -> web.StreamResponse:
    name, key = request.match_info["name"], request.match_info["key"]
    hierarchy = await _hierarchy(request, name)
    document = hierarchy.documents.get(key)
    if document is not None:
        body, etag = document
        headers = {"ETag": etag, "Cache-Control": METADATA_CACHE_CONTROL}
        if _not_modified(request, etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type="application/json", headers=headers)
    array, index = _locate(hierarchy, name, key)
    etag = _etag(hierarchy.identity, key.encode())
    headers = {"ETag": etag, "Cache-Control": CHUNK_CACHE_CONTROL}
    if _not_modified(request, etag):
        return web.Response(status=304, headers=headers)
    state = request.app[STATE]
    encode = partial(encode_chunk, chunk_shape=array.grid.block, fill=array.fill)
    async with state.budget.hold(array.chunk_nbytes) as charge:
        if array.coord is not None:
            body = await asyncio.to_thread(encode, array.coord)
            headers["X-Tierscope-Tier"] = "memory"
        else:
            body, tier = await state.service.raw_block(array.dataset, array.name, index, encode)
            headers["X-Tierscope-Tier"] = tier
        return await stream(request, [(body, len(body))], charge, "application/octet-stream", headers)


@routes.get("/zarr/{name}")
async def zarr_root(request: web.Request) -> web.Response:
    """The hierarchy itself is no key: readers ask for its ``zarr.json``."""
    raise _not_found(f"/zarr/{request.match_info['name']} is a zarr v3 group: open it with zarr or xarray, "
                     "its metadata is zarr.json below it")


@routes.route("OPTIONS", "/zarr/{tail:.*}")
async def preflight(request: web.Request) -> web.Response:
    """CORS preflight: any origin may GET and HEAD, with these headers."""
    return web.Response(status=204, headers=_PREFLIGHT)


async def _cors(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer under /zarr (errors and 401s included) is readable from any origin."""
    if request.path.startswith("/zarr/") or request.path == "/zarr":
        for header, value in _CORS.items():
            response.headers.setdefault(header, value)


def add_zarr_routes(app: web.Application, service: BlockService, budget: ByteBudget) -> None:
    """Serve ``/zarr/{name}/...`` from ``service``, holding chunk bytes against ``budget``."""
    app[STATE] = _State(service, budget, {})
    app.on_response_prepare.append(_cors)
    app.add_routes(routes)


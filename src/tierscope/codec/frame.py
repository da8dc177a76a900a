"""The self-describing block frame: one encoded array, readable without any side information.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic            b"TSF1"
    4       1     format version   u8, currently 2
    5       4     header length    u32, H bytes, at most 65536
    9       4     header checksum  u32, zlib.crc32 of the H header bytes
    13      H     header           UTF-8 JSON object, exactly these keys:
                                     "codec":          short codec name ("raw", "zstd", ...)
                                     "dtype":          numpy dtype ``.str`` ("<f8", ">i4", "|b1")
                                     "shape":          list of non-negative ints, at most 32
                                     "tol":            absolute pointwise error bound asked for
                                     "params":         object, codec parameters (JSON values)
                                     "checksum":       zlib.crc32 of the payload bytes
                                     "payload_nbytes": payload length in bytes
    13 + H  P     payload          codec-specific bytes; the frame ends exactly here

Why this shape: a fixed 13-byte prefix lets a reader reject foreign or future-format bytes
before parsing anything, the length-prefixed JSON header keeps the format extensible (new
codecs add ``params``) while staying bounded, and the two crc32s catch corruption in transit or
at rest before a codec ever sees the frame: the header's (a flipped byte order or an edited tol
would otherwise decode to wrong values without a word) and the payload's.  Every malformed input
raises :class:`~tierscope.errors.FrameError` (:class:`~tierscope.errors.ChecksumError` for a
header or payload that does not match its checksum), never ``struct.error``/``json`` errors.
Version 1 frames (9-byte prefix, no header checksum) are still read: stores written before hold them.
"""

from __future__ import annotations

import json
import math
import numbers
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ChecksumError, FrameError
from .device import DEVICES, import_cupy
from .registry import get_codec

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_HEADER_NBYTES",
    "MAX_NDIM",
    "FrameHeader",
    "decode",
    "encode",
    "pack_frame",
    "parse_header",
    "read_header",
    "unpack_frame",
]

MAGIC = b"TSF1"
FORMAT_VERSION = 2
MAX_HEADER_NBYTES = 64 * 1024
MAX_NDIM = 32

_PREFIX = struct.Struct("<4sBII")
_PREFIX_V1 = struct.Struct("<4sBI")  # version 1: no header checksum (still read: stores hold such frames)
_HEADER_KEYS = frozenset({"codec", "dtype", "shape", "tol", "params", "checksum", "payload_nbytes"})
_NUMERIC_KINDS = frozenset("biufc")
_MAX_DTYPE_STR = 64
_MAX_NBYTES = 2**63 - 1  # anything larger cannot be allocated, let alone decoded

FrameLike = bytes | bytearray | memoryview


@dataclass(frozen=True)
class FrameHeader:
    """Everything a frame says about its payload, validated; cheap to obtain (no decoding)."""

    codec: str
    version: int
    dtype: np.dtype
    shape: tuple[int, ...]
    tol: float
    params: dict[str, Any]
    checksum: int
    payload_offset: int
    payload_nbytes: int

    @property
    def decoded_nbytes(self) -> int:
        """Size in bytes of the decoded array (what a cache must budget for)."""
        return self.dtype.itemsize * math.prod(self.shape)


# --------------------------------------------------------------------------------------------
# validation helpers


def check_tol(tol: Any) -> float:
    """``tol`` as a float, or ValueError: it must be a finite real number >= 0."""
    value = math.nan
    if isinstance(tol, numbers.Real) and not isinstance(tol, (bool, np.bool_)):
        try:
            value = float(tol)
        except OverflowError:
            value = math.inf
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"tol must be a finite float >= 0, got {tol!r}")
    return value


def check_dtype(dtype: np.dtype) -> np.dtype:
    """Accept only plain numeric dtypes (bool, ints, floats, complex): the frame is raw bytes."""
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(
            f"cannot encode dtype {dtype} (kind {dtype.kind!r}): only bool, integer, "
            "float and complex arrays are supported"
        )
    return dtype


def _as_byte_view(frame: FrameLike) -> memoryview:
    try:
        view = memoryview(frame)
    except TypeError:
        raise TypeError(
            f"a frame must be bytes, bytearray or memoryview, not {type(frame).__name__}"
        ) from None
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-finite number {token} is not allowed")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _header_int(obj: dict[str, Any], key: str, upper: int) -> int:
    value = obj[key]
    if not _is_int(value) or not 0 <= value <= upper:
        raise FrameError(f"frame header {key!r} must be an int in [0, {upper}], got {value!r}")
    return value


def _parse_dtype(value: Any) -> np.dtype:
    if not isinstance(value, str) or not value or len(value) > _MAX_DTYPE_STR:
        raise FrameError(f"frame header dtype must be a short numpy dtype string, got {value!r}")
    try:
        dtype = np.dtype(value)
    except Exception:  # numpy's parser raises assorted types for malformed strings
        raise FrameError(f"frame header dtype {value!r} is not a numpy dtype") from None
    try:
        return check_dtype(dtype)
    except ValueError:
        raise FrameError(
            f"frame header dtype {value!r} is not a numeric dtype (bool, int, float, complex)"
        ) from None


def _parse_tol(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            tol = float(value)
        except OverflowError:
            tol = math.inf
        if math.isfinite(tol) and tol >= 0:
            return tol
    raise FrameError(f"frame header tol must be a finite number >= 0, got {value!r:.40}")


def _parse_shape(value: Any, itemsize: int) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise FrameError(f"frame header shape must be a list of ints, got {value!r:.80}")
    if len(value) > MAX_NDIM:
        raise FrameError(f"frame header shape has ndim {len(value)} > {MAX_NDIM}")
    for dim in value:
        if not _is_int(dim):
            raise FrameError(f"frame header shape has a non-integer dimension {dim!r:.40}")
        if dim < 0:
            raise FrameError(f"frame header shape has a negative dimension {dim}")
    shape = tuple(value)
    if any(dim > _MAX_NBYTES for dim in shape) or itemsize * math.prod(shape) > _MAX_NBYTES:
        raise FrameError(f"frame header shape {shape} is too large to decode")
    return shape


# --------------------------------------------------------------------------------------------
# layout


def pack_frame(
    codec: str,
    dtype: np.dtype,
    shape: tuple[int, ...],
    tol: float,
    params: dict[str, Any],
    payload: bytes | bytearray | memoryview,
) -> bytes:
    """Assemble prefix + JSON header + payload, copying the payload exactly once."""
    payload = _as_byte_view(payload)
    header = {
        "codec": codec,
        "dtype": dtype.str,
        "shape": [int(dim) for dim in shape],
        "tol": float(tol),
        "params": params,
        "checksum": zlib.crc32(payload),
        "payload_nbytes": len(payload),
    }
    try:
        text = json.dumps(header, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"codec {codec!r} params are not JSON-serialisable: {exc}") from None
    raw = text.encode("utf-8")
    if len(raw) > MAX_HEADER_NBYTES:
        raise ValueError(
            f"frame header of {len(raw)} bytes exceeds the {MAX_HEADER_NBYTES}-byte limit "
            f"(codec {codec!r} params too large)"
        )
    return b"".join((_PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw), zlib.crc32(raw)), raw, payload))


def parse_header(frame: FrameLike, *, require_payload: bool = True) -> FrameHeader:
    """Parse and validate the prefix and JSON header.

    With ``require_payload`` (the default) the frame must also end exactly after the payload;
    without it, ``frame`` may be just a prefix of a frame (e.g. from a ranged read) that
    contains the whole header.
    """
    view = _as_byte_view(frame)
    prefix = _PREFIX_V1 if len(view) > 4 and view[4] == 1 else _PREFIX
    if len(view) < prefix.size:
        raise FrameError(
            f"truncated frame: {len(view)} bytes is shorter than the {prefix.size}-byte prefix"
        )
    magic, version, header_nbytes, *header_crc = prefix.unpack_from(view)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}: expected {MAGIC!r}, not a tierscope frame")
    if version not in (1, FORMAT_VERSION):
        raise FrameError(
            f"unsupported frame format version {version}; this reader handles 1 and {FORMAT_VERSION}"
        )
    if header_nbytes > MAX_HEADER_NBYTES:
        raise FrameError(
            f"header length {header_nbytes} exceeds the {MAX_HEADER_NBYTES}-byte limit"
        )
    payload_offset = prefix.size + header_nbytes
    if len(view) < payload_offset:
        raise FrameError(
            f"truncated frame: header needs {payload_offset} bytes, only {len(view)} present"
        )
    raw = bytes(view[prefix.size : payload_offset])
    if header_crc and zlib.crc32(raw) != header_crc[0]:
        raise ChecksumError(
            f"header checksum mismatch: prefix says {header_crc[0]:#010x}, header has "
            f"{zlib.crc32(raw):#010x} (frame corrupted)"
        )
    try:
        obj = json.loads(
            raw.decode("utf-8"),
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"frame header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError(f"frame header must be a JSON object, got {type(obj).__name__}")
    missing = _HEADER_KEYS - obj.keys()
    if missing:
        raise FrameError(f"frame header lacks key(s) {', '.join(sorted(missing))}")
    unexpected = obj.keys() - _HEADER_KEYS
    if unexpected:
        raise FrameError(f"frame header has unexpected key(s) {', '.join(sorted(unexpected))}")

    codec = obj["codec"]
    if not isinstance(codec, str):
        raise FrameError(f"frame header codec must be a string, got {codec!r:.40}")
    try:
        get_codec(codec)
    except ValueError as exc:
        raise FrameError(f"frame names an {exc}") from None
    dtype = _parse_dtype(obj["dtype"])
    shape = _parse_shape(obj["shape"], dtype.itemsize)
    tol = _parse_tol(obj["tol"])
    params = obj["params"]
    if not isinstance(params, dict):
        raise FrameError(f"frame header params must be a JSON object, got {params!r:.40}")
    checksum = _header_int(obj, "checksum", 0xFFFFFFFF)
    payload_nbytes = _header_int(obj, "payload_nbytes", _MAX_NBYTES)

    if require_payload:
        present = len(view) - payload_offset
        if present < payload_nbytes:
            raise FrameError(
                f"truncated frame: payload has {present} of {payload_nbytes} bytes"
            )
        if present > payload_nbytes:
            raise FrameError(
                f"frame has {present - payload_nbytes} trailing bytes after the "
                f"{payload_nbytes}-byte payload"
            )
    return FrameHeader(
        codec=codec,
        version=version,
        dtype=dtype,
        shape=shape,
        tol=tol,
        params=params,
        checksum=checksum,
        payload_offset=payload_offset,
        payload_nbytes=payload_nbytes,
    )


def unpack_frame(frame: FrameLike) -> tuple[FrameHeader, memoryview]:
    """Validated header and a zero-copy view of the checksum-verified payload."""
    view = _as_byte_view(frame)
    header = parse_header(view)
    payload = view[header.payload_offset :]
    actual = zlib.crc32(payload)
    if actual != header.checksum:
        raise ChecksumError(
            f"payload checksum mismatch: header says {header.checksum:#010x}, "
            f"payload has {actual:#010x} (frame corrupted)"
        )
    return header, payload


# --------------------------------------------------------------------------------------------
# public API


def read_header(frame: FrameLike) -> FrameHeader:
    """Validate and return a whole frame's header without touching the payload (cheap)."""
    return parse_header(frame)


def encode(array: Any, tol: float = 0.0, codec: str = "lorenzo", device: str = "cpu", **params: Any) -> bytes:
    """Encode ``array`` into a self-describing frame.

    ``tol`` is the absolute pointwise error bound the caller accepts; it is recorded in the
    frame so readers know what fidelity they got.  Lossless codecs satisfy any ``tol``.
    ``params`` go to the codec's constructor (e.g. ``level=9`` for zstd).  ``device="gpu"``
    runs the codec's array stages on the GPU with CuPy (``array`` may be a NumPy or CuPy array)
    and gives the same frame, byte for byte, as the CPU; the entropy stage runs on the host.
    """
    tol = check_tol(tol)
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    cupy = import_cupy() if device == "gpu" else None  # fail fast, before encoding
    codec_cls = get_codec(codec)
    codec_obj = codec_cls.from_kwargs(params)
    on_gpu = type(array).__module__.split(".", 1)[0] == "cupy"
    if on_gpu and cupy is not None:
        arr = cupy.ascontiguousarray(array)
    else:
        if on_gpu:
            array = array.get()  # cupy refuses implicit host transfer; make it explicit
        arr = np.asarray(array, order="C")  # the only copy, and only when not C-contiguous
    check_dtype(arr.dtype)
    if arr.ndim > MAX_NDIM:
        raise ValueError(f"cannot encode a {arr.ndim}-d array: frames hold at most {MAX_NDIM}-d")
    if cupy is None:
        payload, stored = codec_obj.encode_payload(arr, tol)
    else:
        payload, stored = codec_obj.encode_device(arr, tol, cupy)
    if not isinstance(stored, dict) or not all(isinstance(key, str) for key in stored):
        raise TypeError(f"codec {codec!r} returned params {stored!r}; expected a dict[str, ...]")
    return pack_frame(codec_cls.name, arr.dtype, arr.shape, tol, stored, payload)


def decode(frame: FrameLike, device: str = "cpu") -> Any:
    """Decode a frame into a new writeable C-contiguous array of the recorded dtype and shape.

    ``device="gpu"`` returns a CuPy array of the native-byte-order dtype (CuPy has no other):
    the entropy stage runs on the host, the reconstruction of codecs that implement
    ``decode_device`` on the GPU, bit-identical to the CPU result.
    """
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    cupy = import_cupy() if device == "gpu" else None  # fail fast, before decoding

    header, payload = unpack_frame(frame)
    codec_cls = get_codec(header.codec)
    try:
        codec_obj = codec_cls.from_params(header.params)
    except FrameError:
        raise
    except (TypeError, ValueError) as exc:
        raise FrameError(f"frame has invalid {header.codec!r} params: {exc}") from None
    expected = header.dtype if cupy is None else header.dtype.newbyteorder("=")
    try:
        if cupy is None:
            out = codec_obj.decode_payload(payload, header)
        else:
            out = codec_obj.decode_device(payload, header, cupy)
    except FrameError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameError(f"codec {header.codec!r} could not decode the payload: {exc}") from None
    module = np if cupy is None else cupy
    if not isinstance(out, module.ndarray) or out.dtype != expected or out.shape != header.shape:
        raise FrameError(
            f"codec {header.codec!r} decoded {getattr(out, 'dtype', type(out).__name__)} "
            f"{getattr(out, 'shape', '')}, expected {expected.str} {header.shape}"
        )
    if cupy is not None:
        return out if out.flags.c_contiguous else cupy.ascontiguousarray(out)
    if not (out.flags.c_contiguous and out.flags.writeable):
        out = np.array(out, order="C", copy=True)
    return out

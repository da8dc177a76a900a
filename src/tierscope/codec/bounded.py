"""Error-bounded lossy codec ``lorenzo``: prequantisation + N-d Lorenzo prediction + zstd.

Guarantee: for float32/float64 input and ``tol > 0``, every decoded point ``x'`` satisfies
``|x - x'| <= tol`` (exact real-number comparison) for every finite input, denormals and huge
values included; non-finite values (NaN with its payload, +-Inf) come back bit for bit.

Algorithm (the cuSZ "dual quantisation" scheme):

1. ``step`` is the largest value of the array's dtype that is ``<= 2 * tol * (1 - 2**-18)``
   (the small margin keeps rounding from pushing points over the bound; clamped to the dtype's
   largest finite value).  ``q = rint(x / step)`` is computed in float64.
2. Reconstruction is the single IEEE operation ``q.astype(dtype) * dtype.type(step)``
   (``_reconstruct``).  Because it is one correctly rounded multiply (no FMA, no float64
   detour), a CuPy/GPU decoder doing the same elementwise product is bit-identical to NumPy.
3. Every point is verified against ``tol`` after quantising.  Points that fail, non-finite
   values and points with ``|q| >= 2**24`` (float32) / ``2**52`` (float64), where the integer
   would not convert exactly, become *outliers*: their flat index and raw value are stored
   exactly and their ``q`` is replaced by the previous (C-order) regular point's ``q`` so they
   cost (almost) nothing in the residual stream; decode overwrites them with the raw values.
4. Residuals are the N-d Lorenzo residuals of the integer ``q``: successive first differences
   (``np.diff(..., prepend=0)``) along every axis of length > 1, in int64.  Decode is an
   inclusive ``cumsum`` along each such axis (reverse order; any order gives the same result).
   Integer arithmetic makes this exact; int64 wrap-around (possible only for arrays of more
   than ~10 dims) is harmless because differences and prefix sums are exact inverses modulo
   2**64 and the final ``q`` fits in int64.
5. Residuals are stored in the narrowest of int8/int16/int32/int64 that holds them all,
   zigzag-mapped and byte-shuffled (byte planes, least significant plane first) when wider
   than one byte, then zstd-compressed at ``level``.

Payload of a lossy frame (``params["mode"] == "lorenzo"``): one zstd frame (content size
recorded) that decompresses to exactly ``n * w + k * 8 + k * itemsize`` bytes::

    residuals   n values of width w = itemsize(params["rdtype"]), C order; for w > 1 the
                zigzag-mapped unsigned values, byte-shuffled: all least significant bytes,
                then the next byte plane, ...
    indices     k little-endian int64: the outliers' flat C-order indices, delta coded
                (first = index, then differences, all >= 1; strictly increasing, < n)
    values      k raw outlier values, little-endian float of the frame dtype's size

with ``params = {"level", "mode": "lorenzo", "step": float, "rdtype": "<i1"|"<i2"|"<i4"|"<i8",
"n_outliers": k}``.  ``step`` is stored as a JSON float (float64 round-trips exactly, and it is
exactly representable in the frame dtype; decode checks both).

Lossless path (``params["mode"] == "lossless"``, the payload is exactly a ``zstd`` codec
payload): used for ``tol == 0`` (bit-exact round trip), for bool/integer dtypes (always exact,
whatever ``tol``), for float16 and complex dtypes (no lossy path for them yet: they round-trip
exactly, which satisfies any ``tol``), for empty arrays, when ``2 * tol`` underflows to zero in
the dtype, and whenever the lossy payload would not be smaller than the raw array (e.g.
incompressible or nearly all-outlier data).

Decode validates params and sizes and raises :class:`~tierscope.errors.FrameError` for any
inconsistent payload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import zstandard

from ..errors import FrameError
from .lossless import (
    ZSTD_MAX_LEVEL,
    ZSTD_MIN_LEVEL,
    ZstdCodec,
    check_zstd_expansion,
    zstd_decompress_into,
)
from .registry import Codec, register_codec

if TYPE_CHECKING:
    from .frame import FrameHeader

__all__ = ["LorenzoCodec"]

# q must convert to the float dtype exactly: |q| < 2**(mantissa bits + 1) would do, the
# brief's stricter 2**24 / 2**52 keeps a margin.
_Q_LIMIT = {4: float(2**24), 8: float(2**52)}
_STEP_MARGIN = 1.0 - 2.0**-18
_RDTYPES = ("<i1", "<i2", "<i4", "<i8")
_ZIGZAG = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_MODES = ("lorenzo", "lossless")


def _reconstruct(q: np.ndarray, dtype: np.dtype, step: np.floating) -> np.ndarray:
    """The one reconstruction formula, shared by encode-time verification and decode.

    ``q.astype(dtype) * step`` is a single correctly rounded IEEE multiply in ``dtype``
    (``q`` converts exactly since ``|q| < 2**24`` / ``2**52``), so NumPy and CuPy agree bit
    for bit.  Do not rewrite it as ``q * float(step)`` (float64 detour) or fuse it with an add.
    """
    out = q.astype(dtype)
    out *= step
    return out


def _lorenzo_axes(shape: tuple[int, ...]) -> list[int]:
    return [axis for axis, size in enumerate(shape) if size > 1]


def _lorenzo_residuals(q: np.ndarray) -> np.ndarray:
    """N-d Lorenzo residuals: first differences (prepend 0) along every axis of length > 1.

    Same result as chained ``np.diff(..., prepend=0)``, with two ping-pong buffers instead of
    a concatenation per axis.
    """
    cur, spare = q, None
    for axis in _lorenzo_axes(q.shape):
        dst = spare if spare is not None else np.empty_like(q)
        lo = [slice(None)] * q.ndim
        hi, first = list(lo), list(lo)
        lo[axis], hi[axis], first[axis] = slice(None, -1), slice(1, None), slice(0, 1)
        dst[tuple(first)] = cur[tuple(first)]
        np.subtract(cur[tuple(hi)], cur[tuple(lo)], out=dst[tuple(hi)])
        spare = cur if cur is not q else None
        cur = dst
    return cur


def _lorenzo_integrate(res: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_lorenzo_residuals`, in place: inclusive prefix sums per axis."""
    for axis in reversed(_lorenzo_axes(res.shape)):
        size = res.shape[axis]
        if axis == res.ndim - 1 or res.size // size < 2048:
            np.cumsum(res, axis=axis, out=res)
        else:  # a slab-by-slab running sum is much faster than cumsum along an outer axis
            view = np.moveaxis(res, axis, 0)
            for i in range(1, size):
                np.add(view[i], view[i - 1], out=view[i])
    return res


def _choose_step(dtype: np.dtype, tol: float) -> np.floating:
    """Largest dtype value <= 2 tol (1 - 2**-18), clamped to the dtype's max; may be 0."""
    target = min(2.0 * tol * _STEP_MARGIN, float(np.finfo(dtype).max))
    step = dtype.type(target)
    if float(step) > target:
        step = np.nextafter(step, dtype.type(0))
    return step


def _shuffle(res: np.ndarray, width: int) -> bytes:
    """Residuals (int64) as narrow little-endian bytes: zigzag + byte planes when width > 1."""
    if width == 1:
        return res.astype("<i1").tobytes()
    unsigned = _ZIGZAG[width]
    signed = np.dtype(f"<i{width}")
    narrow = res.astype(signed)
    zz = (narrow << 1) ^ (narrow >> (8 * width - 1))  # zigzag: 0,-1,1,-2,... -> 0,1,2,3,...
    little = zz.view(unsigned).astype(np.dtype(unsigned).newbyteorder("<"))
    return np.ascontiguousarray(little.view(np.uint8).reshape(-1, width).T).tobytes()


def _unshuffle(buf: np.ndarray, n: int, width: int) -> np.ndarray:
    """Inverse of :func:`_shuffle`: ``n * width`` bytes to int64 residuals."""
    if width == 1:
        return buf.view("<i1").astype(np.int64)
    planes = np.ascontiguousarray(buf.reshape(width, n).T)
    zz = planes.view(np.dtype(_ZIGZAG[width]).newbyteorder("<")).reshape(n)
    zz = zz.astype(_ZIGZAG[width])  # native byte order
    signed = np.dtype(f"i{width}")
    narrow = (zz >> 1).view(signed) ^ -((zz & 1).view(signed))
    return narrow.astype(np.int64)


def _zstd_decompress_exact(payload: memoryview, expected: int) -> np.ndarray:
    """Decompress one zstd frame into exactly ``expected`` bytes, else FrameError."""
    check_zstd_expansion(payload, expected, "lorenzo payload")
    out = np.empty(expected, dtype=np.uint8)
    zstd_decompress_into(payload, memoryview(out), "lorenzo payload")
    return out


def _param_int(params: dict[str, Any], key: str, upper: int) -> int:
    value = params.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= upper:
        raise FrameError(
            f"lorenzo params {key!r} must be an int in [0, {upper}], got {value!r:.40}"
        )
    return value


@register_codec
@dataclass(frozen=True)
class LorenzoCodec(Codec):
    """Error-bounded lossy codec: ``|x - x'| <= tol`` everywhere, non-finite values exact.

    float32/float64 only on the lossy path; everything else (and ``tol == 0``) is stored
    losslessly.  ``level`` is the zstd level of the entropy stage.
    """

    name: ClassVar[str] = "lorenzo"
    codec_id: ClassVar[str] = "tierscope.lorenzo"
    lossless: ClassVar[bool] = False

    level: int = 3

    def __post_init__(self) -> None:
        level = self.level
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
            raise ValueError(f"lorenzo level must be an int, got {level!r}")
        if not ZSTD_MIN_LEVEL <= level <= ZSTD_MAX_LEVEL:
            raise ValueError(
                f"lorenzo level {level} is outside [{ZSTD_MIN_LEVEL}, {ZSTD_MAX_LEVEL}]"
            )
        object.__setattr__(self, "level", int(level))

    # ---------------------------------------------------------------------------- encode

    def _encode_lossless(self, array: np.ndarray) -> tuple[bytes, dict[str, Any]]:
        payload, _ = ZstdCodec(level=self.level).encode_payload(array, 0.0)
        return payload, {"level": self.level, "mode": "lossless"}

    def encode_payload(self, array: np.ndarray, tol: float) -> tuple[bytes, dict[str, Any]]:
        """Lossy path for non-empty float32/float64 with ``tol > 0``, else lossless."""
        dtype = array.dtype
        if tol <= 0 or dtype.kind != "f" or dtype.itemsize not in _Q_LIMIT or array.size == 0:
            return self._encode_lossless(array)
        native = dtype.newbyteorder("=")
        step = _choose_step(native, tol)
        if not step > 0:  # 2 tol underflows the dtype: only exact storage meets the bound
            return self._encode_lossless(array)
        x = array.astype(native, copy=False)
        n = x.size
        with np.errstate(all="ignore"):
            q64 = x.astype(np.float64)  # always a fresh array
            q64 /= float(step)
            np.rint(q64, out=q64)
            ok = np.abs(q64) < _Q_LIMIT[native.itemsize]  # False for NaN/Inf too
            q64[~ok] = 0.0
            q = q64.astype(np.int64)
            del q64
            recon = _reconstruct(q, native, step)
            if native.itemsize == 4:
                # two float32 values differ exactly in float64 whenever the difference could
                # be near tol, so this comparison is exact
                err = np.abs(x.astype(np.float64) - recon.astype(np.float64))
                ok &= err <= tol
            else:
                # fl(|x - x'|) < tol implies the exact difference is < tol; ties are outliers
                err = np.abs(x - recon)
                ok &= err < tol
            del recon, err
        flat_ok = ok.reshape(-1)
        bad = np.flatnonzero(~flat_ok)
        k = int(bad.size)
        qf = q.reshape(-1)
        if k:
            # predictable fill: repeat the previous regular point's q (C order)
            src = np.where(flat_ok, np.arange(n, dtype=np.int64), 0)
            np.maximum.accumulate(src, out=src)
            qf[bad] = 0
            qf = qf[src]
            q = qf.reshape(x.shape)
        res = _lorenzo_residuals(q)
        lo, hi = (int(res.min()), int(res.max())) if n else (0, 0)
        for rdtype in _RDTYPES:
            info = np.iinfo(rdtype)
            if info.min <= lo and hi <= info.max:
                break
        width = np.dtype(rdtype).itemsize
        values = x.reshape(-1)[bad].astype(native.newbyteorder("<"))
        deltas = np.diff(bad, prepend=0).astype("<i8") if k else np.empty(0, "<i8")
        if k:
            deltas[0] = bad[0]
        body = b"".join((_shuffle(res.reshape(-1), width), deltas.tobytes(), values.tobytes()))
        compressor = zstandard.ZstdCompressor(
            level=self.level, write_checksum=False, write_content_size=True
        )
        payload = compressor.compress(body)
        if len(payload) >= array.nbytes:
            return self._encode_lossless(array)
        params = {
            "level": self.level,
            "mode": "lorenzo",
            "step": float(step),
            "rdtype": rdtype,
            "n_outliers": k,
        }
        return payload, params

    # ---------------------------------------------------------------------------- decode

    def decode_payload(self, payload: memoryview, header: FrameHeader) -> np.ndarray:
        """Rebuild the array; FrameError for params or payload that do not fit the header."""
        params = header.params
        mode = params.get("mode")
        if mode not in _MODES:
            raise FrameError(f"lorenzo params mode must be one of {_MODES}, got {mode!r:.40}")
        if mode == "lossless":
            return ZstdCodec(level=self.level).decode_payload(payload, header)
        dtype = header.dtype
        if dtype.kind != "f" or dtype.itemsize not in _Q_LIMIT:
            raise FrameError(f"lorenzo lossy frame with non float32/float64 dtype {dtype.str}")
        native = dtype.newbyteorder("=")
        n = math.prod(header.shape)
        step_value = params.get("step")
        if not isinstance(step_value, float) or not math.isfinite(step_value) or step_value <= 0:
            raise FrameError(f"lorenzo params step must be a float > 0, got {step_value!r:.40}")
        step = native.type(step_value)
        if float(step) != step_value:
            raise FrameError(f"lorenzo step {step_value!r} is not exactly a {native} value")
        rdtype = params.get("rdtype")
        if rdtype not in _RDTYPES:
            raise FrameError(f"lorenzo params rdtype must be one of {_RDTYPES}, got {rdtype!r:.40}")
        width = np.dtype(rdtype).itemsize
        k = _param_int(params, "n_outliers", n)
        expected = n * width + k * (8 + native.itemsize)
        buf = _zstd_decompress_exact(payload, expected)

        res = _unshuffle(buf[: n * width], n, width).reshape(header.shape)
        q = _lorenzo_integrate(res)
        limit = _Q_LIMIT[native.itemsize]
        if n and max(-int(q.min()), int(q.max())) >= limit:
            raise FrameError("lorenzo residuals decode to quantisation codes out of range")
        out = _reconstruct(q, native, step)
        if k:
            offset = n * width
            deltas = buf[offset : offset + 8 * k].view("<i8")
            if int(deltas[0]) < 0 or (k > 1 and int(deltas[1:].min()) < 1):
                raise FrameError("lorenzo outlier indices are not strictly increasing")
            if int(deltas.max()) >= n:
                raise FrameError("lorenzo outlier index out of range")
            indices = np.cumsum(deltas.astype(np.int64))
            if int(indices[-1]) >= n or np.any(indices[1:] <= indices[:-1]):
                raise FrameError("lorenzo outlier index out of range")
            values = buf[offset + 8 * k :].view(native.newbyteorder("<"))
            out.reshape(-1)[indices] = values
        return out.astype(dtype, copy=False)

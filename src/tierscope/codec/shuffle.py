"""Residual serialisation: narrowest integer width, zigzag, byte or bit planes.

Residuals are mostly small signed integers.  Zigzag maps them to unsigned (0, -1, 1, -2, ... ->
0, 1, 2, 3, ...) so that small magnitudes have all-zero high bits; splitting the values into
byte planes (``byte``) or bit planes (``bit``) then puts those zeros together, which is what lets
zstd compress them to almost nothing.  Bit planes compress better when most residuals are 0 or
+-1 (loose bounds), byte planes are cheaper to undo.

Layouts for ``n`` residuals of width ``w`` bytes (``w == 1`` byte mode: plain int8, no zigzag)::

    byte: w planes of n bytes, least significant byte plane first
    bit:  8w planes of ceil(n / 8) bytes, least significant bit plane first; bit i of plane byte
          j is the plane's bit for value 8j + i (NumPy's ``bitorder="little"``)

Decoders (``unshuffle``) take an array namespace ``xp`` and use only integer shifts, ors and
``unpackbits`` on flat arrays, which CuPy has too; the NumPy fast paths give identical integers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .device import to_host

__all__ = ["RDTYPES", "SHUFFLES", "narrowest", "shuffle", "shuffled_nbytes", "unshuffle"]

RDTYPES = ("<i1", "<i2", "<i4", "<i8")
SHUFFLES = ("byte", "bit")
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def narrowest(res: Any) -> str:
    """The narrowest of ``RDTYPES`` that holds every value of ``res`` (int64, NumPy or CuPy)."""
    lo, hi = (int(res.min()), int(res.max())) if res.size else (0, 0)
    for rdtype in RDTYPES:
        info = np.iinfo(rdtype)
        if info.min <= lo and hi <= info.max:
            return rdtype
    raise AssertionError("int64 residuals always fit <i8")


def shuffled_nbytes(n: int, width: int, kind: str) -> int:
    """Serialised size of ``n`` residuals of ``width`` bytes."""
    return n * width if kind == "byte" else 8 * width * ((n + 7) // 8)


def _zigzag(res: Any, width: int) -> Any:
    """Little-endian unsigned zigzag codes of int64 residuals that fit ``width`` bytes."""
    narrow = res.astype(f"<i{width}")
    # the cast keeps the width whatever a namespace promotes ``narrow << 1`` to (same bits either way)
    zz = ((narrow << 1) ^ (narrow >> (8 * width - 1))).astype(narrow.dtype, copy=False)
    return zz.view(_UNSIGNED[width]).astype(np.dtype(_UNSIGNED[width]).newbyteorder("<"), copy=False)


def _bit_planes(xp: Any, zz: Any, width: int) -> Any:
    """The ``8 width`` bit planes of the codes ``zz``, each padded with zero bits to whole bytes."""
    n = zz.size
    nb = (n + 7) // 8
    if n != 8 * nb:  # zero codes pad exactly as packbits pads each plane
        padded = xp.zeros(8 * nb, dtype=zz.dtype)
        padded[:n] = zz
        zz = padded
    bits = xp.unpackbits(zz.view(np.uint8), bitorder="little").reshape(8 * nb, 8 * width)
    return xp.packbits(xp.ascontiguousarray(bits.T).reshape(-1), bitorder="little")


def shuffle(res: Any, width: int, kind: str, xp: Any = np) -> bytes:
    """Serialise flat int64 residuals (which fit ``width`` bytes) as ``kind`` planes.

    The planes are built in namespace ``xp`` (NumPy, or CuPy on a GPU: integer ops only, so the
    bytes are the same) and copied to the host once, already narrowed, for the entropy stage.
    """
    if kind == "byte" and width == 1:
        planes = res.astype("<i1")
    else:
        zz = _zigzag(res, width)
        if kind == "byte":
            planes = xp.ascontiguousarray(zz.view(np.uint8).reshape(-1, width).T)
        else:
            planes = _bit_planes(xp, zz, width)
    return to_host(xp, planes).tobytes()


def _zigzag_decode(zz: Any, width: int, out: np.dtype) -> Any:
    signed = np.dtype(f"i{width}")
    return ((zz >> 1).view(signed) ^ -((zz & 1).view(signed))).astype(out)


def unshuffle(xp: Any, buf: Any, n: int, width: int, kind: str, out: np.dtype) -> Any:
    """Inverse of :func:`shuffle`: ``shuffled_nbytes`` uint8 values to ``n`` residuals.

    ``out`` (int32 or int64) is the integer type the caller decodes in; residuals wider than it
    wrap, which callers tolerate (modular sums) or range-check.
    """
    if kind == "byte" and width == 1:
        return buf.view(np.int8).astype(out)
    if xp is np and kind == "byte":  # fast path: a NumPy transpose regroups the bytes
        planes = np.ascontiguousarray(buf.reshape(width, n).T)
        zz = planes.view(np.dtype(_UNSIGNED[width]).newbyteorder("<")).reshape(n)
        return _zigzag_decode(zz.astype(_UNSIGNED[width]), width, out)
    return _zigzag_decode(planes_to_unsigned(xp, buf, n, width, kind), width, out)


def planes_to_unsigned(xp: Any, buf: Any, n: int, width: int, kind: str) -> Any:
    """Generic (any ``xp``) reassembly of the zigzag codes from byte or bit planes."""
    unsigned = _UNSIGNED[width]
    zz = xp.zeros(n, dtype=unsigned)
    if kind == "byte":
        planes = buf.reshape(width, n)
        for b in range(width):
            zz |= planes[b].astype(unsigned) << unsigned(8 * b)
        return zz
    nb = (n + 7) // 8
    bits = xp.unpackbits(buf, bitorder="little").reshape(8 * width, 8 * nb)
    for b in range(8 * width):
        zz |= bits[b, :n].astype(unsigned, copy=False) << unsigned(b)
    return zz

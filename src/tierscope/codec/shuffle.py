"""Residual serialisation: narrowest integer width, zigzag, byte, crumb or bit planes.

Residuals are mostly small signed integers.  Zigzag maps them to unsigned (0, -1, 1, -2, ... ->
0, 1, 2, 3, ...) so that small magnitudes have all-zero high bits; splitting the values into
byte planes (``byte``), 2-bit planes (``crumb``) or bit planes (``bit``) then puts those zeros
together, which is what lets zstd compress them to almost nothing.  Bit planes compress well when
most residuals are 0 or +-1 (loose bounds), byte planes are cheaper to undo.  Crumb planes keep
the zigzag codes 0..3 (residuals -2..1) whole in the lowest plane, so zstd's byte-wise Huffman
stage sees their joint statistics, four residuals to a byte: splitting 0/+-1 residuals into two
bit planes loses the dependence between their sign and magnitude bits (about 5% at 1e-2 bounds).

Layouts for ``n`` residuals of width ``w`` bytes (``w == 1`` byte mode: plain int8, no zigzag)::

    byte:  w planes of n bytes, least significant byte plane first
    crumb: 4w planes of ceil(n / 4) bytes, least significant plane first; bits 2i, 2i + 1 of
           plane byte j are the plane's two bits for value 4j + i
    bit:   8w planes of ceil(n / 8) bytes, least significant bit plane first; bit i of plane byte
           j is the plane's bit for value 8j + i (NumPy's ``bitorder="little"``)

Decoders (``unshuffle``) take an array namespace ``xp`` and use only table gathers, integer
shifts and ors, which CuPy has too; the NumPy fast path gives identical integers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .device import to_host

__all__ = ["RDTYPES", "SHUFFLES", "narrowest", "shuffle", "shuffled_nbytes", "unshuffle"]

RDTYPES = ("<i1", "<i2", "<i4", "<i8")
SHUFFLES = ("byte", "bit", "crumb")
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_PER_BYTE = {"bit": 8, "crumb": 4}


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
    if kind == "byte":
        return n * width
    per = _PER_BYTE[kind]  # values per plane byte, and planes per byte of width
    return per * width * ((n + per - 1) // per)


def _zigzag(res: Any, width: int) -> Any:
    """Little-endian unsigned zigzag codes of int64 residuals that fit ``width`` bytes."""
    narrow = res.astype(f"<i{width}")
    # the cast keeps the width whatever a namespace promotes ``narrow << 1`` to (same bits either way)
    zz = ((narrow << 1) ^ (narrow >> (8 * width - 1))).astype(narrow.dtype, copy=False)
    return zz.view(_UNSIGNED[width]).astype(np.dtype(_UNSIGNED[width]).newbyteorder("<"), copy=False)


def _pack_planes(xp: Any, zz: Any, width: int, bits: int) -> Any:
    """The ``8 width / bits`` planes of ``bits``-bit fields of the codes ``zz`` (bit or crumb layout).

    Planes are padded with zero codes to whole bytes.  Each byte plane is read as little-endian
    words of ``8 / bits`` values; a field's bits sit at ``8 i + bit offset`` in a word, and
    or-ing the word with itself shifted right by ``8 - bits``, then twice that, and so on, gathers
    the ``8 / bits`` fields into the low byte, value i at bits ``bits * i``.  Integer shifts, ands
    and ors only, in any ``xp``.
    """
    per = 8 // bits
    n = zz.size
    nb = (n + per - 1) // per
    if n != per * nb:
        padded = xp.zeros(per * nb, dtype=zz.dtype)
        padded[:n] = zz
        zz = padded
    word = np.dtype(f"<u{per}")
    field = word.type(sum(((1 << bits) - 1) << (8 * i) for i in range(per)))
    planes = xp.empty((width, per, nb), dtype=np.uint8)
    for b in range(width):
        words = (zz >> zz.dtype.type(8 * b)).astype(np.uint8).view(word)
        for t in range(per):
            m = (words >> word.type(bits * t)) & field
            shift = 8 - bits
            while shift < 8 * per - 8:  # 1, 2, 4 ... fields gathered
                m |= m >> word.type(shift)
                shift *= 2
            planes[b, t] = (m & word.type(0xFF)).astype(np.uint8)
    return planes.reshape(-1)


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
            planes = _pack_planes(xp, zz, width, 8 // _PER_BYTE[kind])
    return to_host(xp, planes).tobytes()


def _zigzag_decode(zz: Any, width: int, out: np.dtype) -> Any:
    signed = np.dtype(f"i{width}")
    return ((zz >> 1).view(signed) ^ -((zz & 1).view(signed))).astype(out)


def unshuffle(xp: Any, buf: Any, n: int, width: int, kind: str, out: np.dtype) -> Any:
    """Inverse of :func:`shuffle`: ``shuffled_nbytes`` uint8 values to ``n`` residuals.

    Bit and crumb planes are first regrouped into byte planes (:func:`_to_byte_planes`), so all
    three kinds share the byte-plane reassembly.  ``out`` (int32 or int64) is the integer type
    the caller decodes in; residuals wider than it wrap, which callers tolerate (modular sums)
    or range-check.
    """
    if kind == "byte" and width == 1:
        return buf.view(np.int8).astype(out)
    unsigned = _UNSIGNED[width]
    if kind == "byte" and xp is np:  # fast path: a NumPy transpose regroups the bytes
        zz = np.ascontiguousarray(buf.reshape(width, n).T).view(np.dtype(unsigned).newbyteorder("<"))
        return _zigzag_decode(zz.reshape(n).astype(unsigned), width, out)
    planes = buf.reshape(width, n) if kind == "byte" else _to_byte_planes(xp, buf, n, width, kind)
    if width == 1:
        return _zigzag_decode(planes[0], width, out)
    zz = xp.zeros(n, dtype=unsigned)
    for b in range(width):
        zz |= planes[b].astype(unsigned) << unsigned(8 * b)
    return _zigzag_decode(zz, width, out)


def _spread_table(bits: int) -> np.ndarray:
    """Byte ``v`` -> its ``8 / bits`` fields of ``bits`` bits, field i in byte i of a little-endian word."""
    per = 8 // bits
    v = np.arange(256, dtype=np.uint64)[:, None]
    fields = (v >> np.arange(0, 8, bits, dtype=np.uint64)) & np.uint64((1 << bits) - 1)
    word = (fields << (8 * np.arange(per, dtype=np.uint64))).sum(axis=1, dtype=np.uint64)
    return word.astype(f"<u{per}")


# per kind: (bits per field, table); a lookup spreads one plane byte over the bytes of its values
_SPREAD = {"bit": (1, _spread_table(1)), "crumb": (2, _spread_table(2))}


def _to_byte_planes(xp: Any, buf: Any, n: int, width: int, kind: str) -> Any:
    """The ``(width, n)`` byte planes of bit or crumb planes (any ``xp``: gathers, shifts, ors).

    Each of the ``8 / bits`` planes of one byte plane is looked up in a 256-entry table that
    places its fields in separate bytes of a word; shifting each by its bit offset and or-ing
    them gives the byte plane's bytes for ``8 / bits`` values at once.
    """
    bits, table = _SPREAD[kind]
    per = 8 // bits
    nb = (n + per - 1) // per
    planes = buf.reshape(width, per, nb)
    lookup = xp.asarray(table)
    octets = xp.empty((width, nb), dtype=table.dtype)
    for b in range(width):
        acc = lookup[planes[b, 0]]
        for t in range(1, per):
            acc |= lookup[planes[b, t]] << table.dtype.type(bits * t)
        octets[b] = acc
    return octets.view(np.uint8).reshape(width, per * nb)[:, :n]

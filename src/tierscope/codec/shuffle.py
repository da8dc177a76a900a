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

Decoders (``unshuffle``) take an array namespace ``xp`` and use only integer shifts, ands, ors
and xors, which CuPy has too; the NumPy fast path for byte planes gives identical integers.
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
    """Signed values of the unsigned zigzag codes ``zz`` as ``out``; ``zz`` (a scratch array) is overwritten.

    In place in the narrow type, so only the final widening allocates a full-size array.
    """
    signed = np.dtype(f"i{width}")
    sign = (zz & zz.dtype.type(1)).view(signed)
    sign *= signed.type(-1)  # 0 or -1: all ones for odd codes
    zz >>= zz.dtype.type(1)
    half = zz.view(signed)
    half ^= sign
    return half.astype(out)


def unshuffle(xp: Any, buf: Any, n: int, width: int, kind: str, out: np.dtype) -> Any:
    """Inverse of :func:`shuffle`: ``shuffled_nbytes`` uint8 values to ``n`` residuals.

    Bit and crumb planes are first regrouped into byte planes (:func:`_to_byte_planes`), so all
    three kinds share the byte-plane reassembly.  ``out`` (int32 or int64) is the integer type
    the caller decodes in; residuals wider than it wrap, which callers tolerate (modular sums)
    or range-check.  ``buf`` is only read.
    """
    if kind == "byte" and width == 1:
        return buf.view(np.int8).astype(out)
    unsigned = _UNSIGNED[width]
    if kind == "byte" and xp is np:  # fast path: a NumPy transpose regroups the bytes
        zz = np.ascontiguousarray(buf.reshape(width, n).T).view(np.dtype(unsigned).newbyteorder("<"))
        return _zigzag_decode(zz.reshape(n).astype(unsigned), width, out)
    planes = buf.reshape(width, n) if kind == "byte" else _to_byte_planes(xp, buf, n, width, kind)
    zz = planes[0].astype(unsigned)
    for b in range(1, width):
        wide = planes[b].astype(unsigned)
        wide <<= unsigned(8 * b)
        zz |= wide
    return _zigzag_decode(zz, width, out)


def _swap_masks(bits: int) -> list[tuple[int, int]]:
    """(shift, mask) of the delta swaps that transpose a ``per x per`` matrix of ``bits``-bit fields.

    The matrix fills a little-endian word of ``per = 8 / bits`` bytes, row ``t`` in byte ``t``,
    field ``(t, i)`` at bit ``8 t + bits i``.  Swap ``s`` (1, 2, 4 ...) exchanges the fields
    ``(t, i)`` with ``t & s == 0 < i & s`` (the mask) and ``(t + s, i - s)``, ``s (8 - bits)``
    bits higher; after all of them field ``(t, i)`` sits at ``(i, t)``.
    """
    per = 8 // bits
    swaps = []
    s = 1
    while s < per:
        mask = sum(((1 << bits) - 1) << (8 * t + bits * i)
                   for t in range(per) for i in range(per) if not t & s and i & s)
        swaps.append((s * (8 - bits), mask))
        s *= 2
    return swaps


_FIELD_BITS = {"bit": 1, "crumb": 2}
_SWAPS = {kind: _swap_masks(bits) for kind, bits in _FIELD_BITS.items()}


def _to_byte_planes(xp: Any, buf: Any, n: int, width: int, kind: str) -> Any:
    """The ``(width, n)`` byte planes of bit or crumb planes (any ``xp``: shifts, ands, xors).

    Byte ``j`` of the ``8 / bits`` planes of one byte plane gathered into one word are a square
    matrix of ``bits``-bit fields (row = plane, column = value ``8 / bits * j + column``); its
    transpose (:func:`_swap_masks`, done in place on all words at once) has the byte plane's
    bytes of those values in its bytes, in order.
    """
    per = 8 // _FIELD_BITS[kind]
    nb = (n + per - 1) // per
    word = np.dtype(f"<u{per}")
    planes = buf.reshape(width, per, nb)
    octets = xp.empty((width, nb, per), dtype=np.uint8)
    for t in range(per):  # a strided copy per plane: ~4x faster in NumPy than one transposing copy
        octets[:, :, t] = planes[:, t]
    words = octets.view(word)
    tmp = xp.empty_like(words)
    for shift, mask in _SWAPS[kind]:
        xp.right_shift(words, word.type(shift), out=tmp)
        tmp ^= words
        tmp &= word.type(mask)
        words ^= tmp
        tmp <<= word.type(shift)
        words ^= tmp
    return words.view(np.uint8).reshape(width, per * nb)[:, :n]

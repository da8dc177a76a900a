"""Lossless codecs: ``raw`` (plain C-order bytes) and ``zstd``.

Both reproduce the input bit for bit (NaN payloads and byte order included), so they satisfy
any error bound a caller asks for.  Payloads are the array's bytes in its own byte order; the
frame header carries the dtype string, so big-endian input decodes to the same big-endian dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import zstandard

from ..errors import FrameError
from .registry import Codec, register_codec

if TYPE_CHECKING:
    from .frame import FrameHeader

__all__ = ["RawCodec", "ZstdCodec"]

# zstd's own level bounds (ZSTD_minCLevel() is -(1 << 17)); 0 means zstd's default level.
ZSTD_MIN_LEVEL = -(1 << 17)
ZSTD_MAX_LEVEL = zstandard.MAX_COMPRESSION_LEVEL

# A zstd block yields at most 128 KiB and the smallest block that does (RLE) is 4 bytes, so a
# payload cannot expand by more than 32768x; twice that leaves margin.  Checking this before
# allocating keeps a tiny forged frame from demanding terabytes.
_ZSTD_MAX_EXPANSION = 1 << 16


def _byte_view(array: np.ndarray) -> memoryview:
    """Flat uint8 view of a C-contiguous array (0-d and empty included), without copying."""
    return memoryview(array.reshape(-1).view(np.uint8))


def check_zstd_expansion(payload: memoryview, expected: int, what: str) -> None:
    """Refuse, before allocating, a frame claiming more output than zstd can expand to."""
    if expected > _ZSTD_MAX_EXPANSION * max(len(payload), 1):
        raise FrameError(f"{what}: {len(payload)} bytes cannot decode to {expected} bytes")


def zstd_decompress_into(payload: memoryview, dest: memoryview, what: str) -> None:
    """Decompress one zstd frame into exactly ``len(dest)`` bytes of ``dest``, else FrameError.

    Sizes are checked before anything is allocated or written, so a tiny forged frame cannot
    demand terabytes; ``what`` names the payload in error messages.
    """
    expected = len(dest)
    check_zstd_expansion(payload, expected, what)
    try:
        content_size = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise FrameError(f"{what} is not a zstd frame: {exc}") from None
    if content_size != zstandard.CONTENTSIZE_UNKNOWN and content_size != expected:
        raise FrameError(f"{what} decompresses to {content_size} bytes, {expected} needed")
    filled = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            payload, read_size=max(len(payload), 1), read_across_frames=True
        )
        with reader:
            while filled < expected:
                got = reader.readinto(dest[filled:])
                if not got:
                    break
                filled += got
            overflow = reader.read(1)
    except zstandard.ZstdError as exc:
        raise FrameError(f"corrupt {what}: {exc}") from None
    if filled != expected or overflow:
        more = "more than " if overflow else ""
        raise FrameError(f"{what} decompresses to {more}{filled} bytes, {expected} needed")


@register_codec
@dataclass(frozen=True)
class RawCodec(Codec):
    """Uncompressed C-order bytes: the fastest path when the link is faster than compression."""

    name: ClassVar[str] = "raw"
    codec_id: ClassVar[str] = "tierscope.raw"
    lossless: ClassVar[bool] = True

    def encode_payload(self, array: np.ndarray, tol: float) -> tuple[memoryview, dict[str, Any]]:
        """The array's bytes as a zero-copy view (the frame packer copies them once)."""
        return _byte_view(array), {}

    def decode_payload(self, payload: memoryview, header: FrameHeader) -> np.ndarray:
        """Copy the payload into a fresh aligned array of the header's dtype and shape."""
        expected = header.decoded_nbytes
        if len(payload) != expected:
            raise FrameError(
                f"raw payload has {len(payload)} bytes but dtype {header.dtype.str} and shape "
                f"{header.shape} need {expected}"
            )
        out = np.empty(header.shape, dtype=header.dtype)
        if expected:
            _byte_view(out)[:] = payload
        return out


@register_codec
@dataclass(frozen=True)
class ZstdCodec(Codec):
    """Zstandard-compressed C-order bytes; ``level`` trades encode speed for size."""

    name: ClassVar[str] = "zstd"
    codec_id: ClassVar[str] = "tierscope.zstd"
    lossless: ClassVar[bool] = True

    level: int = 3

    def __post_init__(self) -> None:
        level = self.level
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
            raise ValueError(f"zstd level must be an int, got {level!r}")
        if not ZSTD_MIN_LEVEL <= level <= ZSTD_MAX_LEVEL:
            raise ValueError(
                f"zstd level {level} is outside [{ZSTD_MIN_LEVEL}, {ZSTD_MAX_LEVEL}]"
            )
        object.__setattr__(self, "level", int(level))  # keep configs JSON-serialisable

    def encode_payload(self, array: np.ndarray, tol: float) -> tuple[bytes, dict[str, Any]]:
        """Compress straight from the array's buffer; the level is stored for provenance."""
        # zstd's own checksum is redundant with the frame's crc32; the content size is what
        # lets decode validate the decompressed size before writing anything.
        compressor = zstandard.ZstdCompressor(
            level=self.level, write_checksum=False, write_content_size=True
        )
        return compressor.compress(_byte_view(array)), {"level": self.level}

    def decode_payload(self, payload: memoryview, header: FrameHeader) -> np.ndarray:
        """Decompress directly into the output array's memory (no intermediate bytes)."""
        what = f"zstd payload for dtype {header.dtype.str} and shape {header.shape}"
        check_zstd_expansion(payload, header.decoded_nbytes, what)
        out = np.empty(header.shape, dtype=header.dtype)
        zstd_decompress_into(payload, _byte_view(out), what)
        return out

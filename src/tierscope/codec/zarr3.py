"""tierscope frames as a zarr v3 array-to-bytes codec and as a numcodecs codec.

A zarr v3 array whose ``codecs`` are ``[TierscopeZarrCodec(codec="bounded", tol=1e-3)]`` stores
every chunk as one self-describing tierscope frame, so a store can hold blocks already encoded at
a tolerance (the block server can then hand them out without re-encoding).  Importing this module
registers the codec with zarr under the name ``"tierscope"``; the numcodecs flavour
(``TierscopeNumcodec``, codec id ``"tierscope"``) is registered with numcodecs' registry.

    import zarr
    from tierscope.codec.zarr3 import TierscopeZarrCodec
    z = zarr.create_array(store, shape=(64, 64), chunks=(32, 32), dtype="f4",
                          serializer=TierscopeZarrCodec(codec="bounded", tol=1e-3), compressors=None)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numcodecs
import numcodecs.abc
import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import parse_named_configuration
from zarr.registry import register_codec as zarr_register_codec

from .frame import check_tol, decode, encode
from .registry import get_codec

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

__all__ = ["TierscopeNumcodec", "TierscopeZarrCodec"]

ZARR_NAME = "tierscope"


def _check(codec: Any, tol: Any) -> tuple[str, float]:
    if not isinstance(codec, str):
        raise ValueError(f"tierscope codec name must be a str, got {codec!r}")
    get_codec(codec)  # ValueError naming the known codecs (or the missing package)
    return codec, check_tol(tol)


@dataclass(frozen=True)
class TierscopeZarrCodec(ArrayBytesCodec):
    """zarr v3 array -> bytes codec writing one tierscope frame per chunk."""

    is_fixed_size = False

    codec: str
    tol: float

    def __init__(self, *, codec: str = "bounded", tol: float = 0.0) -> None:
        codec, tol = _check(codec, tol)
        object.__setattr__(self, "codec", codec)
        object.__setattr__(self, "tol", tol)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Parse ``{"name": "tierscope", "configuration": {"codec": ..., "tol": ...}}``."""
        _, configuration = parse_named_configuration(data, ZARR_NAME, require_configuration=False)
        return cls(**(configuration or {}))

    def to_dict(self) -> dict[str, Any]:
        """The JSON stored in the array metadata."""
        return {"name": ZARR_NAME, "configuration": {"codec": self.codec, "tol": self.tol}}

    def evolve_from_array_spec(self, array_spec: ArraySpec) -> Self:
        """Nothing to infer: frames record dtype and shape themselves."""
        return self

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        """Variable-size output, like any compressor."""
        raise NotImplementedError

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        # in a thread, as zarr's own compressors do: a decode must not stall zarr's event loop
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        array = decode(chunk_bytes.as_numpy_array().tobytes())
        dtype = chunk_spec.dtype.to_native_dtype()
        array = array.astype(dtype, copy=False).reshape(chunk_spec.shape)
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(array)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        frame = encode(chunk_array.as_numpy_array(), self.tol, codec=self.codec)
        return chunk_spec.prototype.buffer.from_bytes(frame)


class TierscopeNumcodec(numcodecs.abc.Codec):
    """numcodecs codec (``id="tierscope"``): ``encode`` gives a frame, ``decode`` an array."""

    codec_id = ZARR_NAME

    def __init__(self, codec: str = "bounded", tol: float = 0.0) -> None:
        self.codec, self.tol = _check(codec, tol)

    def encode(self, buf: Any) -> bytes:
        """One tierscope frame for the array ``buf``."""
        return encode(np.asarray(buf), self.tol, codec=self.codec)

    def decode(self, buf: Any, out: Any = None) -> np.ndarray:
        """The decoded array; copied into ``out`` (same size) when given."""
        array = decode(bytes(memoryview(buf)))
        if out is None:
            return array
        target = np.asarray(out)
        if not target.flags.c_contiguous:  # reshape would copy, and the data would not reach ``out``
            raise ValueError("out must be C-contiguous")
        if target.nbytes != array.nbytes:
            raise ValueError(f"out has {target.nbytes} bytes, the frame decodes to {array.nbytes}")
        target.reshape(-1).view(array.dtype)[:] = array.reshape(-1)
        return out

    def get_config(self) -> dict[str, Any]:
        """JSON-serialisable config: ``{"id": "tierscope", "codec": ..., "tol": ...}``."""
        return {"id": self.codec_id, "codec": self.codec, "tol": self.tol}


zarr_register_codec(ZARR_NAME, TierscopeZarrCodec)
numcodecs.register_codec(TierscopeNumcodec)

"""Baseline codecs for the evaluation, behind the same frame/registry interface.

- ``fp16``: cast to float16 and back; lossy and *not* bounded (its real error is what the
  benchmark reports, and each frame records it as ``params["max_error"]``); inf/nan survive, finite
  values beyond float16's range become inf. At ``tol == 0`` it stores losslessly: a frame never claims
  a bound its values break.
- ``zfp``: ZFP fixed-accuracy mode (``zfpy``) with ``tolerance=tol``.
- ``sz3``: SZ3 absolute error bound (``pysz``).

ZFP and SZ3 bound finite values only (NaN/Inf handling is theirs, not tierscope's) and accept at
most 4-D, so blocks with more dimensions are reshaped to 4-D (leading axes merged).  Anything
they cannot take (non-float dtypes, empty arrays, ``tol == 0``) is stored losslessly, as with
the bounded codecs.  A codec whose library does not import is left out of ``codec_ids()`` and
``get_codec`` names the missing package (``registry.register_missing``).  MGARD is not provided:
``pymgard`` is not installable here, so there is no tested adapter for it.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..errors import FrameError
from .lossless import ZstdCodec
from .registry import Codec, register_codec, register_missing

if TYPE_CHECKING:
    from .frame import FrameHeader

__all__ = ["Fp16Codec"]

_MAX_LIB_NDIM = 4


def _lossless(array: np.ndarray) -> tuple[bytes, dict[str, Any]]:
    payload, _ = ZstdCodec().encode_payload(array, 0.0)
    return payload, {"mode": "lossless"}


def _mode(header: FrameHeader, lossy: str) -> str:
    mode = header.params.get("mode")
    if mode not in (lossy, "lossless"):
        raise FrameError(f"{header.codec} params mode must be {lossy!r} or 'lossless', got {mode!r:.40}")
    return mode


def _lib_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """At most 4 axes (leading ones merged) for libraries limited to 4-D."""
    if len(shape) <= _MAX_LIB_NDIM:
        return shape
    cut = len(shape) - _MAX_LIB_NDIM + 1
    return (math.prod(shape[:cut]), *shape[cut:])


def _lossy_ok(array: np.ndarray, tol: float) -> bool:
    return tol > 0 and array.dtype.kind == "f" and array.dtype.itemsize in (4, 8) and array.size > 0


class _LibCodec(Codec):
    """Shared decode plumbing: lossless fallback, dtype/shape restoration."""

    lossless: ClassVar[bool] = False
    mode: ClassVar[str]

    def decode_payload(self, payload: memoryview, header: FrameHeader) -> np.ndarray:
        """Decode with the library (or zstd for the lossless fallback) into the header's array."""
        if _mode(header, self.mode) == "lossless":
            return ZstdCodec().decode_payload(payload, header)
        native = header.dtype.newbyteorder("=")
        if header.dtype.kind != "f" or native.itemsize not in (4, 8):
            raise FrameError(f"{self.name} lossy frame with dtype {header.dtype.str}")
        try:
            out = self._decode(payload, native, _lib_shape(header.shape))
        except FrameError:
            raise
        except Exception as exc:  # the libraries raise assorted types on corrupt input
            raise FrameError(f"{self.name} payload does not decode: {exc}") from None
        if out.size != math.prod(header.shape):
            raise FrameError(f"{self.name} payload decodes to {out.size} values")
        return np.ascontiguousarray(out.reshape(header.shape)).astype(header.dtype, copy=False)

    @abc.abstractmethod
    def _decode(self, payload: memoryview, native: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The library's decoded array (native dtype, any shape of the right size)."""


class _BoundedLibCodec(_LibCodec):
    """A library codec with an absolute error bound, on native data of at most 4 axes; lossless where
    the library cannot take the block (tol 0, integers, empty)."""

    def encode_payload(self, array: np.ndarray, tol: float) -> tuple[bytes, dict[str, Any]]:
        if not _lossy_ok(array, tol):
            return _lossless(array)
        x = array.astype(array.dtype.newbyteorder("="), copy=False).reshape(_lib_shape(array.shape))
        return self._compress(x, tol), {"mode": self.mode}

    @abc.abstractmethod
    def _compress(self, x: np.ndarray, tol: float) -> bytes:
        """The library's payload for native data ``x`` at absolute bound ``tol``."""


@register_codec
@dataclass(frozen=True)
class Fp16Codec(_LibCodec):
    """float16 cast: the "FP16 transfer" baseline (lossy, unbounded)."""

    name: ClassVar[str] = "fp16"
    codec_id: ClassVar[str] = "tierscope.fp16"
    mode: ClassVar[str] = "fp16"

    def encode_payload(self, array: np.ndarray, tol: float) -> tuple[bytes, dict[str, Any]]:
        """Half the bytes of float32, with the real error recorded; non-float input, and any at
        tol 0, is stored losslessly."""
        if array.dtype.kind != "f" or array.size == 0 or tol == 0:
            return _lossless(array)
        with np.errstate(over="ignore", invalid="ignore"):
            half = array.astype("<f2")
            error = np.abs(half.astype(array.dtype) - array)
        finite = error[np.isfinite(error)]
        return half.tobytes(), {"mode": "fp16", "max_error": float(finite.max()) if finite.size else 0.0}

    def _decode(self, payload: memoryview, native: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        if len(payload) != 2 * math.prod(shape):
            raise FrameError(f"fp16 payload has {len(payload)} bytes for {math.prod(shape)} values")
        return np.frombuffer(payload, dtype="<f2").astype(native)


try:
    import zfpy
except ImportError as exc:
    register_missing("zfp", "zfpy", str(exc))
else:

    @register_codec
    @dataclass(frozen=True)
    class ZfpCodec(_BoundedLibCodec):
        """ZFP fixed-accuracy (``zfpy``): |x - x'| <= tol on finite values."""

        name: ClassVar[str] = "zfp"
        codec_id: ClassVar[str] = "tierscope.zfp"
        mode: ClassVar[str] = "zfp"

        def _compress(self, x: np.ndarray, tol: float) -> bytes:
            return zfpy.compress_numpy(x, tolerance=tol)

        def _decode(self, payload: memoryview, native: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
            out = zfpy.decompress_numpy(bytes(payload))
            if out.dtype != native:
                raise FrameError(f"zfp payload holds {out.dtype}, header says {native}")
            return out

    __all__ += ["ZfpCodec"]


try:
    import pysz
except ImportError as exc:
    register_missing("sz3", "pysz", str(exc))
else:

    @register_codec
    @dataclass(frozen=True)
    class Sz3Codec(_BoundedLibCodec):
        """SZ3 with an absolute error bound (``pysz``): |x - x'| <= tol on finite values."""

        name: ClassVar[str] = "sz3"
        codec_id: ClassVar[str] = "tierscope.sz3"
        mode: ClassVar[str] = "sz3"

        def _compress(self, x: np.ndarray, tol: float) -> bytes:
            config = pysz.szConfig(x.shape)  # ABS mode: the same absolute bound as tierscope's
            config.errorBoundMode = pysz.szErrorBoundMode.ABS
            config.absErrorBound = tol
            compressed, _ = pysz.sz.compress(np.ascontiguousarray(x), config)
            return compressed.tobytes()

        def _decode(self, payload: memoryview, native: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
            out, _ = pysz.sz.decompress(np.frombuffer(payload, dtype=np.uint8), native, shape)
            return out

    __all__ += ["Sz3Codec"]

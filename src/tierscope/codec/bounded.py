"""Error-bounded lossy codecs: ``lorenzo``, ``interp`` and ``bounded`` (per-block choice).

Guarantee (all three): for float32/float64 input and ``tol > 0``, every decoded point ``x'``
satisfies ``|x - x'| <= tol`` (exact real-number comparison) for every finite input, denormals
and huge values included; non-finite values (NaN with its payload, +-Inf) come back bit for bit.
``tol == 0``, integer/bool, float16 and complex dtypes are stored losslessly.

``step`` is the largest dtype value ``<= 2 tol (1 - 2**-18)`` (:func:`quantize.choose_step`).
Predictors work on int64 codes and decoding is integer arithmetic followed by the single IEEE
multiply ``codes.astype(dtype) * unit`` (:func:`quantize.reconstruct`); every point is verified
against ``tol`` at encode time with that exact formula and failures, non-finite values and
out-of-range codes become *outliers*, stored exactly (flat index + raw value).

Modes (``params["mode"]``) and their payload (one zstd frame, content size recorded)::

    lorenzo   codes q = rint(x / step); N-d Lorenzo residuals in C order, byte planes
              (:mod:`shuffle`); unit = step.
              params: level, mode, step, rdtype, n_outliers
    interp    codes k on a lattice 2**frac_bits finer than step, rebuilt level by level by
              multilevel cubic/linear interpolation of already-decoded codes plus a residual
              (:func:`predictors.interp_encode`); residuals of every point but the origin
              (whose code is ``anchor``) in step order, bit or crumb planes (``shuffle``);
              unit = step * 2**-frac_bits.  ``axes``: the axis order within a level (absent:
              0, 1, ...); ``units``: per level, finest first, the lattice units one residual
              counts (absent: 2**frac_bits, one step, at every level).
              params: level, mode, step, frac_bits, order, axes, [units], anchor, rdtype,
              shuffle, n_outliers
    lossless  exactly a ``zstd`` codec payload.  params: level, mode

A lossy payload decompresses to exactly ``R + k * 8 + k * itemsize`` bytes: the ``R`` residual
bytes, then the ``k`` outliers' flat C-order indices as little-endian int64 deltas (first =
index, then differences >= 1), then their raw values as little-endian floats of the frame dtype.

``lorenzo`` decodes with prefix sums, ``interp`` compresses far better at loose bounds (its
prediction absorbs the quantisation noise), ``bounded`` encodes both and keeps the smaller frame
(interp only when at least 1% smaller: lorenzo decodes 2-3x faster).  ``interp`` itself keeps the smallest of up to four candidates: bit and crumb planes of the
one-step residuals and, when at least 4/5 of those are zero (smooth data, loose bounds), of
SZ3's level-wise bound (level j's unit is one step / min(1.75**j, 4)): more precise coarse
levels improve every finer prediction on such data, and cost more than they save elsewhere.
Its planes go through zstd with lazy2 matching and >= 6-byte matches (:func:`_compressor`).

Every mode's decode is one function of an array namespace ``xp`` (``decode_device``): NumPy on
the CPU, CuPy on a GPU, bit-identical results; so is the encode up to the zstd stage
(``encode_device``), which gives byte-identical frames.  The lossless path is also used for empty
arrays, when ``2 tol`` underflows the dtype, and when a lossy payload would not be smaller than
the raw array.
"""

from __future__ import annotations

import abc
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
from .predictors import (
    INTERP_ORDERS,
    interp_axes,
    interp_decode,
    interp_encode,
    interp_levels,
    lorenzo_integrate,
    lorenzo_residuals,
)
from .quantize import Q_LIMIT, choose_step, prequantise, reconstruct, verify
from .device import to_host
from .registry import Codec, register_codec
from .shuffle import RDTYPES, SHUFFLES, narrowest, shuffle, shuffled_nbytes, unshuffle

if TYPE_CHECKING:
    from .frame import FrameHeader

__all__ = ["BoundedCodec", "InterpCodec", "LorenzoCodec"]

MAX_FRAC_BITS = 8
_LOSSY_MODES = ("lorenzo", "interp")
# candidates compete on payload size x weight: lorenzo decodes 2-3x faster than interp on a CPU,
# so interp must be at least 1% smaller to be kept
_SIZE_WEIGHT = {"lorenzo": 99, "interp": 100}
_INTERP_SHUFFLES = ("bit", "crumb")  # both are tried; byte planes never win on interp residuals
# SZ3's level-wise error bound: level j (0 = finest) gets eb / min(ALPHA**j, BETA) ...
_TIGHT_ALPHA, _TIGHT_BETA = 1.75, 4.0
# ... tried only when at least 4/5 of the one-step residuals are zero (smooth data or loose
# bounds: there better coarse values pay off at every finer level; elsewhere they cost more)
_TIGHT_MIN_ZEROS = (4, 5)


@dataclass(frozen=True)
class _Lossy:
    """One candidate encoding of a block: the payload body (before zstd) and its params."""

    body: bytes
    params: dict[str, Any]


def _outlier_bytes(xp: Any, indices: Any, values: Any, dtype: np.dtype) -> bytes:
    """The outliers' index deltas and raw values, on the host (there are few of them)."""
    indices, values = to_host(xp, indices), to_host(xp, values)
    deltas = np.diff(indices, prepend=0).astype("<i8") if indices.size else np.empty(0, "<i8")
    return deltas.tobytes() + values.astype(dtype.newbyteorder("<")).tobytes()


def _fine_unit(dtype: np.dtype, step: float, frac_bits: int) -> np.floating:
    """``step * 2**-frac_bits`` as one multiply in ``dtype`` (encode and decode share it)."""
    return dtype.type(step) * dtype.type(2.0**-frac_bits)


def _frac_bits(xp: Any, y: Any, limit: float) -> int:
    """Finest lattice (<= MAX_FRAC_BITS extra bits) keeping every finite code below limit/2."""
    top = float(xp.where(xp.isfinite(y), xp.abs(y), 0.0).max())
    room = (limit / 4) / (top + 1.0)
    return int(min(MAX_FRAC_BITS, max(0, math.floor(math.log2(room))))) if room >= 1 else 0


def _encode_lorenzo(xp: Any, x: Any, step: np.floating, tol: float, level: int) -> _Lossy:
    quant = prequantise(x, step, tol, xp)
    res = lorenzo_residuals(quant.q, xp).reshape(-1)
    rdtype = narrowest(res)
    body = shuffle(res, np.dtype(rdtype).itemsize, "byte", xp)
    params = {"level": level, "mode": "lorenzo", "step": float(step), "rdtype": rdtype,
              "n_outliers": int(quant.indices.size)}
    return _Lossy(body + _outlier_bytes(xp, quant.indices, quant.values, x.dtype), params)


def _tight_units(frac_bits: int, levels: int) -> list[int] | None:
    """Per-level residual units of the level-wise bound, or None where they equal one step."""
    units = [max(1, round((1 << frac_bits) / min(_TIGHT_ALPHA**j, _TIGHT_BETA))) for j in range(levels)]
    return None if all(u == 1 << frac_bits for u in units) else units


def _interp_candidates(
    xp: Any, x: Any, y: Any, regular: Any, step: np.floating, tol: float, params: dict[str, Any],
    units: list[int] | None,
) -> tuple[list[_Lossy], Any]:
    """One interpolation encode, serialised as bit and as crumb planes; also its residuals."""
    limit = Q_LIMIT[x.dtype.itemsize]
    anchor, res, k = interp_encode(
        y, regular, params["frac_bits"], params["order"], int(limit) // 2, xp, params["axes"], units
    )
    unit = _fine_unit(x.dtype, float(step), params["frac_bits"])
    ok = regular & verify(x, reconstruct(xp, k, x.dtype, unit), tol, xp)
    del k
    bad = xp.flatnonzero(~ok.reshape(-1)).astype(np.int64)
    outliers = _outlier_bytes(xp, bad, x.reshape(-1)[bad], x.dtype)
    rdtype = narrowest(res)
    params = {**params, "anchor": anchor, "rdtype": rdtype, "n_outliers": int(bad.size)}
    if units is not None:
        params["units"] = units
    return [
        _Lossy(shuffle(res, np.dtype(rdtype).itemsize, kind, xp) + outliers, {**params, "shuffle": kind})
        for kind in _INTERP_SHUFFLES
    ], res


def _encode_interp(xp: Any, x: Any, step: np.floating, tol: float, level: int, order: int) -> list[_Lossy]:
    """Interpolation candidates: one-step residuals, plus the level-wise bound where it may pay."""
    limit = Q_LIMIT[x.dtype.itemsize]
    with np.errstate(all="ignore"):
        y = x.astype(np.float64)
        y /= float(step)
        frac_bits = _frac_bits(xp, y, limit)
        y *= 2.0**frac_bits
        regular = xp.abs(y) < limit / 2  # False for NaN/Inf too
    params = {"level": level, "mode": "interp", "step": float(step), "frac_bits": frac_bits,
              "order": order, "axes": interp_axes(y, regular, frac_bits, xp)}
    candidates, res = _interp_candidates(xp, x, y, regular, step, tol, params, None)
    zeros_num, zeros_den = _TIGHT_MIN_ZEROS
    units = _tight_units(frac_bits, interp_levels(x.shape))
    if units is not None and res.size and int((res == 0).sum()) * zeros_den >= zeros_num * res.size:
        del res
        candidates += _interp_candidates(xp, x, y, regular, step, tol, params, units)[0]
    return candidates


# ------------------------------------------------------------------------------- decoding


def _param_int(params: dict[str, Any], key: str, lower: int, upper: int) -> int:
    value = params.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lower <= value <= upper:
        raise FrameError(f"params {key!r} must be an int in [{lower}, {upper}], got {value!r:.40}")
    return value


def _param_choice(params: dict[str, Any], key: str, choices: tuple[Any, ...]) -> Any:
    value = params.get(key)
    if value not in choices or isinstance(value, bool):
        raise FrameError(f"params {key!r} must be one of {choices}, got {value!r:.40}")
    return value


def _param_axes(params: dict[str, Any], ndim: int) -> list[int] | None:
    """Interpolation axis order; absent (frames before it existed): ``0, 1, ...``."""
    if "axes" not in params:
        return None
    value = params["axes"]
    if (not isinstance(value, list) or any(isinstance(a, bool) or not isinstance(a, int) for a in value)
            or sorted(value) != list(range(ndim))):
        raise FrameError(f"params 'axes' must be a permutation of range({ndim}), got {value!r:.60}")
    return value


def _param_units(params: dict[str, Any], frac_bits: int, levels: int) -> list[int] | None:
    """Per-level residual units; absent (the default, and older frames): one step everywhere."""
    if "units" not in params:
        return None
    value = params["units"]
    top = 1 << frac_bits
    if (not isinstance(value, list) or len(value) != levels
            or any(isinstance(u, bool) or not isinstance(u, int) or not 1 <= u <= top for u in value)):
        raise FrameError(
            f"params 'units' must be {levels} ints in [1, {top}] (one per level), got {value!r:.60}"
        )
    return value


def _param_step(params: dict[str, Any], native: np.dtype) -> float:
    value = params.get("step")
    if not isinstance(value, float) or not math.isfinite(value) or value <= 0:
        raise FrameError(f"params step must be a float > 0, got {value!r:.40}")
    if float(native.type(value)) != value:
        raise FrameError(f"params step {value!r} is not exactly a {native} value")
    return value


def _check_codes(xp: Any, codes: Any, limit: float) -> None:
    if codes.size and max(-int(codes.min()), int(codes.max())) >= limit:
        raise FrameError("residuals decode to quantisation codes out of range")


def _scatter_outliers(xp: Any, out: Any, buf: np.ndarray, offset: int, k: int, native: np.dtype) -> None:
    """Write the ``k`` exactly stored outliers of ``buf[offset:]`` into ``out`` (flat)."""
    n = out.size
    deltas = buf[offset : offset + 8 * k].view("<i8").astype(np.int64)
    if int(deltas[0]) < 0 or (k > 1 and int(deltas[1:].min()) < 1) or int(deltas.max()) >= n:
        raise FrameError("outlier indices are not strictly increasing within the block")
    indices = np.cumsum(deltas)
    if int(indices[-1]) >= n:
        raise FrameError("outlier index out of range")
    values = buf[offset + 8 * k :].view(native.newbyteorder("<")).astype(native)
    out.reshape(-1)[xp.asarray(indices)] = xp.asarray(values)


def _decode_lossy(payload: memoryview, header: FrameHeader, xp: Any) -> Any:
    """Rebuild a lorenzo/interp block with array namespace ``xp`` (validated params)."""
    params = header.params
    mode = params["mode"]
    dtype = header.dtype
    if dtype.kind != "f" or dtype.itemsize not in Q_LIMIT:
        raise FrameError(f"lossy frame with non float32/float64 dtype {dtype.str}")
    native = dtype.newbyteorder("=")
    limit = Q_LIMIT[native.itemsize]
    n = math.prod(header.shape)
    step = _param_step(params, native)
    rdtype = _param_choice(params, "rdtype", RDTYPES)
    width = np.dtype(rdtype).itemsize
    k = _param_int(params, "n_outliers", 0, n)
    if mode == "lorenzo":
        kind, n_res, frac_bits = "byte", n, 0
    else:
        kind = _param_choice(params, "shuffle", SHUFFLES)
        frac_bits = _param_int(params, "frac_bits", 0, MAX_FRAC_BITS)
        order = _param_choice(params, "order", INTERP_ORDERS)
        anchor = _param_int(params, "anchor", -int(limit) + 1, int(limit) - 1)
        axes = _param_axes(params, len(header.shape))
        units = _param_units(params, frac_bits, interp_levels(header.shape))
        n_res = max(n - 1, 0)
    res_nbytes = shuffled_nbytes(n_res, width, kind)
    expected = res_nbytes + k * (8 + native.itemsize)
    check_zstd_expansion(payload, expected, f"{mode} payload")
    buf = np.empty(expected, dtype=np.uint8)
    zstd_decompress_into(payload, memoryview(buf), f"{mode} payload")

    # int32 codes for float32 are exact (|code| < 2**24) and halve the memory traffic
    code_dtype = np.dtype(np.int32 if native.itemsize == 4 else np.int64)
    res = unshuffle(xp, xp.asarray(buf[:res_nbytes]), n_res, width, kind, code_dtype)
    if mode == "lorenzo":
        codes = lorenzo_integrate(xp, res.reshape(header.shape))
    else:
        codes = interp_decode(xp, res, header.shape, anchor, frac_bits, order, axes, units)
    _check_codes(xp, codes, limit)
    out = reconstruct(xp, codes, native, _fine_unit(native, step, frac_bits))
    if k:
        _scatter_outliers(xp, out, buf, res_nbytes, k, native)
    return out if xp is not np else out.astype(dtype, copy=False)


# --------------------------------------------------------------------------------- codecs


def _compressor(level: int, mode: str) -> zstandard.ZstdCompressor:
    """zstd at ``level``; for ``interp`` planes with at least lazy2 matching and 6-byte matches.

    Interpolation residual planes are noise-like: the short matches that fast strategies take
    there cost more than the literals they replace (frames 0.5-12% smaller on the benchmark's
    fields, most at loose bounds, for ~2x the time of level-3 zstd, still small next to the
    prediction).  Lorenzo byte planes keep plain ``level`` (the same trade would cost ~45% of
    its encode time for 0-8%), as do fast (negative) levels.
    """
    if level < 0 or mode != "interp":
        return zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
    base = zstandard.ZstdCompressionParameters.from_level(level)
    params = zstandard.ZstdCompressionParameters.from_level(
        level, strategy=max(base.strategy, zstandard.STRATEGY_LAZY2),
        min_match=max(base.min_match, 6), write_checksum=False, write_content_size=True,
    )
    return zstandard.ZstdCompressor(compression_params=params)


@dataclass(frozen=True)
class _BoundedBase(Codec):
    """Shared encode/decode of the error-bounded codecs; subclasses pick the candidate modes."""

    lossless: ClassVar[bool] = False
    modes: ClassVar[tuple[str, ...]]

    level: int = 3

    def __post_init__(self) -> None:
        level = self.level
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
            raise ValueError(f"{self.name} level must be an int, got {level!r}")
        if not ZSTD_MIN_LEVEL <= level <= ZSTD_MAX_LEVEL:
            raise ValueError(
                f"{self.name} level {level} is outside [{ZSTD_MIN_LEVEL}, {ZSTD_MAX_LEVEL}]"
            )
        object.__setattr__(self, "level", int(level))

    @abc.abstractmethod
    def _candidates(self, xp: Any, x: Any, step: np.floating, tol: float) -> list[_Lossy]:
        """The lossy encodings to try for native-dtype ``x`` (an ``xp`` array); the smallest is kept."""

    def _encode_lossless(self, array: np.ndarray) -> tuple[bytes, dict[str, Any]]:
        payload, _ = ZstdCodec(level=self.level).encode_payload(array, 0.0)
        return payload, {"level": self.level, "mode": "lossless"}

    def encode_payload(self, array: np.ndarray, tol: float) -> tuple[bytes, dict[str, Any]]:
        """Encode on the CPU: :meth:`encode_device` with NumPy."""
        return self.encode_device(array, tol, np)

    def encode_device(self, array: Any, tol: float, xp: Any) -> tuple[bytes, dict[str, Any]]:
        """Smallest lossy candidate (``_SIZE_WEIGHT``) for non-empty float32/float64 with ``tol > 0``.

        Lossless instead for other input, or when no candidate is smaller than the raw array.

        One code path for CPU and GPU: quantisation, prediction, verification, outlier detection
        and plane shuffling run in ``xp`` (NumPy or CuPy; ``array`` may live in either), zstd on
        the host, so both produce the same payload byte for byte.
        """
        dtype = array.dtype
        if tol <= 0 or dtype.kind != "f" or dtype.itemsize not in Q_LIMIT or array.size == 0:
            return self._encode_lossless(to_host(xp, array))
        native = dtype.newbyteorder("=")
        step = choose_step(native, tol)
        if not step > 0:  # 2 tol underflows the dtype: only exact storage meets the bound
            return self._encode_lossless(to_host(xp, array))
        x = xp.asarray(array.astype(native, copy=False))
        compressors = {mode: _compressor(self.level, mode) for mode in _LOSSY_MODES}
        best: tuple[int, bytes, dict[str, Any]] | None = None
        for candidate in self._candidates(xp, x, step, tol):
            mode = candidate.params["mode"]
            payload = compressors[mode].compress(candidate.body)
            cost = len(payload) * _SIZE_WEIGHT[mode]
            if best is None or cost < best[0]:
                best = cost, payload, candidate.params
        assert best is not None
        _, payload, params = best
        if len(payload) >= array.nbytes:
            return self._encode_lossless(to_host(xp, array))
        return payload, params

    def decode_payload(self, payload: memoryview, header: FrameHeader) -> np.ndarray:
        """Rebuild the array on the CPU; FrameError for params or payload that do not fit."""
        return self.decode_device(payload, header, np)

    def decode_device(self, payload: memoryview, header: FrameHeader, xp: Any) -> Any:
        """Rebuild the array with namespace ``xp`` (NumPy or CuPy): one code path for both."""
        mode = _param_choice(header.params, "mode", (*self.modes, "lossless"))
        if mode == "lossless":
            out = ZstdCodec(level=self.level).decode_payload(payload, header)
            return out if xp is np else xp.asarray(out.astype(out.dtype.newbyteorder("=")))
        return _decode_lossy(payload, header, xp)


@register_codec
@dataclass(frozen=True)
class LorenzoCodec(_BoundedBase):
    """Prequantisation + N-d Lorenzo (prefix-sum decode): fast, good at tight bounds."""

    name: ClassVar[str] = "lorenzo"
    codec_id: ClassVar[str] = "tierscope.lorenzo"
    modes: ClassVar[tuple[str, ...]] = ("lorenzo",)

    def _candidates(self, xp: Any, x: Any, step: np.floating, tol: float) -> list[_Lossy]:
        return [_encode_lorenzo(xp, x, step, tol, self.level)]


def _check_order(codec: Codec, order: Any) -> None:
    if order not in INTERP_ORDERS or isinstance(order, bool):
        raise ValueError(f"{codec.name} order must be one of {INTERP_ORDERS}, got {order!r}")


@register_codec
@dataclass(frozen=True)
class InterpCodec(_BoundedBase):
    """Multilevel interpolation (``order`` 3: cubic, 1: linear): best at loose bounds."""

    name: ClassVar[str] = "interp"
    codec_id: ClassVar[str] = "tierscope.interp"
    modes: ClassVar[tuple[str, ...]] = ("interp",)

    order: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_order(self, self.order)

    def _candidates(self, xp: Any, x: Any, step: np.floating, tol: float) -> list[_Lossy]:
        return _encode_interp(xp, x, step, tol, self.level, self.order)


@register_codec
@dataclass(frozen=True)
class BoundedCodec(_BoundedBase):
    """Per block, whichever of Lorenzo and interpolation gives the smaller frame."""

    name: ClassVar[str] = "bounded"
    codec_id: ClassVar[str] = "tierscope.bounded"
    modes: ClassVar[tuple[str, ...]] = _LOSSY_MODES

    order: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_order(self, self.order)

    def _candidates(self, xp: Any, x: Any, step: np.floating, tol: float) -> list[_Lossy]:
        return [
            _encode_lorenzo(xp, x, step, tol, self.level),
            *_encode_interp(xp, x, step, tol, self.level, self.order),
        ]

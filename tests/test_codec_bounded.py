"""Tests of the error-bounded ``lorenzo`` codec: the pointwise bound, exact paths, ratio, errors."""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.frames import mutate_frame
from tierscope.codec import codec_ids, decode, encode, get_codec, read_header
from tierscope.codec.bounded import LorenzoCodec
from tierscope.codec.frame import pack_frame
from tierscope.errors import ChecksumError, FrameError

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
UINT = {4: np.uint32, 8: np.uint64}


def assert_bounded(x: np.ndarray, y: np.ndarray, tol: float) -> None:
    """dtype/shape kept, |x - y| <= tol on finite points, non-finite points bit-identical."""
    assert isinstance(y, np.ndarray)
    assert y.dtype == x.dtype and y.dtype.str == x.dtype.str and y.shape == x.shape
    assert y.flags.c_contiguous and y.flags.writeable
    xf, yf = x.reshape(-1), y.reshape(-1)
    if x.dtype.kind != "f" or x.dtype.itemsize not in UINT:
        assert y.tobytes() == x.tobytes()
        return
    finite = np.isfinite(xf)
    native = x.dtype.newbyteorder("=")
    xn, yn = xf.astype(native), yf.astype(native)
    ubits = UINT[x.dtype.itemsize]
    assert np.array_equal(xn[~finite].view(ubits), yn[~finite].view(ubits))
    assert np.all(np.isfinite(yn[finite]))
    if tol == 0:
        assert y.tobytes() == x.tobytes()
        return
    err = np.abs(xn[finite].astype(np.float64) - yn[finite].astype(np.float64))
    assert err.size == 0 or float(err.max()) <= tol, (float(err.max()), tol)
    if xn.size <= 256:  # exact rational check: no rounding in the test itself
        ftol = Fraction(tol)
        for a, b in zip(xn[finite].tolist(), yn[finite].tolist()):
            assert abs(Fraction(a) - Fraction(b)) <= ftol


def round_trip(x: np.ndarray, tol: float, **params: Any) -> np.ndarray:
    frame = encode(x, tol, codec="lorenzo", **params)
    out = decode(frame)
    assert_bounded(x, out, tol)
    return out


# ------------------------------------------------------------------------------ strategies


@st.composite
def float_blocks(draw: st.DrawFn) -> tuple[np.ndarray, float]:
    dtype = np.dtype(draw(st.sampled_from(["<f4", "<f8", ">f4", ">f8"])))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=7))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = math.prod(shape)
    kind = draw(st.sampled_from(["normal", "uniform", "constant", "smooth", "spiky", "denormal"]))
    scale = 10.0 ** draw(st.integers(-40, 36 if dtype.itemsize == 4 else 300))
    offset = draw(st.sampled_from([0.0, 1.0, -1e3, 1e6])) * scale
    if kind == "normal":
        v = rng.standard_normal(n) * scale + offset
    elif kind == "uniform":
        v = rng.uniform(-scale, scale, n)
    elif kind == "constant":
        v = np.full(n, offset + scale)
    elif kind == "smooth":
        v = np.sin(np.linspace(0, 6, n)) * scale + offset
    elif kind == "spiky":
        v = rng.standard_normal(n) * 1e-3 * scale
        spikes = rng.random(n) < 0.1
        v[spikes] = rng.choice([-1.0, 1.0], int(spikes.sum())) * scale * 1e6
    else:  # denormals of the dtype, mixed signs, a few normals
        tiny = float(np.finfo(dtype).smallest_subnormal)
        v = rng.integers(-1000, 1000, n) * tiny
    with np.errstate(all="ignore"):
        x = v.astype(dtype.newbyteorder("="))
    if draw(st.booleans()) and n:
        ubits = UINT[dtype.itemsize]
        bits = x.view(ubits)
        m = int(rng.integers(1, max(2, n // 3) + 1))
        where = rng.integers(0, n, m)
        exp_mask = ubits(0x7F800000) if dtype.itemsize == 4 else ubits(0x7FF0000000000000)
        mant_bits = 23 if dtype.itemsize == 4 else 52
        mant = rng.integers(0, 2**mant_bits, m, dtype=np.uint64).astype(ubits)
        sign = rng.integers(0, 2, m, dtype=np.uint64).astype(ubits) << ubits(8 * dtype.itemsize - 1)
        bits[where] = sign | exp_mask | mant  # mant == 0 gives +-Inf, else NaN with payload
    x = x.reshape(shape).astype(dtype)
    finite = x[np.isfinite(x)].astype(np.float64)
    value_range = float(finite.max() - finite.min()) if finite.size else 1.0
    base = value_range if math.isfinite(value_range) and value_range > 0 else max(scale, 1e-300)
    tol_kind = draw(st.sampled_from(["relative", "absolute", "spacing", "huge"]))
    if tol_kind == "relative":  # from far below the values' spacing to far above the range
        tol = base * 10.0 ** draw(st.integers(-14, 4))
    elif tol_kind == "absolute":
        tol = draw(st.sampled_from([1e-320, 1e-310, 1e-45, 1e-40, 1e-30, 1e-7, 0.5, 1.0, 3.0]))
    elif tol_kind == "spacing":
        with np.errstate(over="ignore"):  # a float32 offset beyond its range: inf, replaced below
            spacing = float(np.spacing(dtype.type(max(abs(offset), scale))))
        tol = spacing * draw(st.sampled_from([0.25, 0.5, 1.0, 2.0]))
    else:
        tol = draw(st.sampled_from([1e30, 1e38, 3.4e38, 1e300, 1.7e308]))
    tol = float(tol)
    if not (math.isfinite(tol) and tol > 0):
        tol = 1.0
    return x, tol


# ------------------------------------------------------------------------------ the bound


@FUZZ
@given(case=float_blocks())
def test_bound_holds_on_random_blocks(case: tuple[np.ndarray, float]) -> None:
    x, tol = case
    round_trip(x, tol)


@FUZZ
@given(
    x=hnp.arrays(
        st.sampled_from([np.dtype("<f4"), np.dtype("<f8")]),
        hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    ),
    tol=st.floats(min_value=0.0, max_value=1e308, allow_subnormal=True),
)
def test_bound_holds_on_hypothesis_edge_values(x: np.ndarray, tol: float) -> None:
    round_trip(x, tol)


@pytest.mark.parametrize("dtype", ["<f4", "<f8"])
@pytest.mark.parametrize("rel", [1e-7, 1e-5, 1e-3, 1e-1, 10.0])
def test_bound_on_larger_smooth_and_noisy_fields(dtype: str, rel: float) -> None:
    rng = np.random.default_rng(7)
    g = np.linspace(0, 4, 24)
    field = np.sin(g)[:, None, None] * np.cos(2 * g)[None, :, None] + g[None, None, :] ** 2
    field = (field * 1e4 + rng.standard_normal(field.shape)).astype(dtype)
    field[3, 4, 5] = np.nan
    field[0, 0, 0] = -np.inf
    value_range = float(np.nanmax(field[np.isfinite(field)]) - np.nanmin(field[np.isfinite(field)]))
    round_trip(field, rel * value_range)


def test_float32_rounding_traps() -> None:
    """Values whose quotient by step lands near .5: the case that breaks naive rounding."""
    rng = np.random.default_rng(3)
    tol = 1e-3
    step = 2 * tol
    q = rng.integers(-(2**22), 2**22, 200_000)
    x = ((q + 0.5) * step + rng.uniform(-1e-6, 1e-6, q.size) * step).astype(np.float32)
    round_trip(x, tol)
    round_trip(x.astype(np.float64), tol)


def test_quantisation_code_limit_and_huge_values() -> None:
    x = np.array([1e30, -3e38, 2.0**24, 1.0, -(2.0**30), 0.0], dtype=np.float32)
    for tol in (0.5, 1.0, 1e-10, 1e20, 1e38):
        round_trip(x, tol)
    y = np.array([1e300, -1.7e308, 2.0**53, 1.0, 5e-324, -0.0], dtype=np.float64)
    for tol in (0.5, 1e-300, 5e-324, 1e290, 1e308):
        round_trip(y, tol)


def test_non_finite_bits_exact() -> None:
    x = np.linspace(0, 1, 100, dtype=np.float32)
    bits = x.view(np.uint32)
    bits[[3, 50, 99]] = [0x7FC01234, 0xFFBFFFFF, 0x7F800001]  # NaNs with payloads, one signalling
    x[[10, 11]] = [np.inf, -np.inf]
    out = round_trip(x, 1e-2)
    assert out.view(np.uint32)[[3, 50, 99]].tolist() == [0x7FC01234, 0xFFBFFFFF, 0x7F800001]


def test_outliers_recorded_and_cheap() -> None:
    g = np.linspace(0, 1, 64)
    x = np.add.outer(np.sin(6 * g), np.cos(5 * g)).astype(np.float64)
    x[5:9, 5:40] = np.nan
    frame = encode(x, 1e-4, codec="lorenzo")
    header = read_header(frame)
    assert header.params["mode"] == "lorenzo"
    assert header.params["n_outliers"] == 4 * 35
    assert_bounded(x, decode(frame), 1e-4)


# ------------------------------------------------------------------------------ exact paths


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f8", ">f8", "<f2", "<c8", ">c16"])
def test_tol_zero_is_bit_exact(dtype: str) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 7, 3)).astype(dtype)
    x.reshape(-1)[:3] = [np.nan, np.inf, -0.0]
    frame = encode(x, 0.0, codec="lorenzo")
    assert read_header(frame).params == {"level": 3, "mode": "lossless"}
    out = decode(frame)
    assert out.dtype.str == x.dtype.str and out.tobytes() == x.tobytes()


@FUZZ
@given(
    x=hnp.arrays(
        st.one_of(
            hnp.boolean_dtypes(),
            hnp.integer_dtypes(endianness="?"),
            hnp.unsigned_integer_dtypes(endianness="?"),
            hnp.floating_dtypes(endianness="?", sizes=(16,)),
            hnp.complex_number_dtypes(endianness="?", sizes=(64, 128)),
        ),
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    ),
    tol=st.floats(min_value=0.0, max_value=1e300),
)
def test_other_dtypes_exact_for_any_tol(x: np.ndarray, tol: float) -> None:
    frame = encode(x, tol, codec="lorenzo")
    assert read_header(frame).params["mode"] == "lossless"
    out = decode(frame)
    assert out.dtype.str == x.dtype.str and out.shape == x.shape
    assert out.tobytes() == x.tobytes()


def test_empty_zero_d_and_size_one_axes() -> None:
    for shape in [(0,), (3, 0, 2), (), (1,), (1, 1, 1, 1), (1, 5, 1, 3)]:
        for dtype in ("<f4", "<f8"):
            x = np.arange(math.prod(shape), dtype=dtype).reshape(shape) * 0.1
            round_trip(x, 0.01)


def test_non_contiguous_and_big_endian_lossy() -> None:
    g = np.linspace(0, 3, 4000)
    base = np.sin(g).reshape(40, 100)
    for x in (base[:, ::3], base.T, base.astype(">f4"), base.astype(">f8")[::-1]):
        frame = encode(x, 1e-3, codec="lorenzo")
        assert read_header(frame).params["mode"] == "lorenzo"
        assert_bounded(np.ascontiguousarray(x), decode(frame), 1e-3)


def test_tiny_tol_that_underflows_falls_back_to_lossless() -> None:
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    frame = encode(x, 1e-46, codec="lorenzo")  # 2 tol < float32's smallest subnormal
    assert read_header(frame).params["mode"] == "lossless"
    assert decode(frame).tobytes() == x.tobytes()


def test_incompressible_data_never_larger_than_lossless() -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal(50_000)
    frame = encode(x, 1e-14, codec="lorenzo")  # nearly every point an outlier
    assert len(frame) <= len(encode(x, codec="zstd")) + 200
    assert_bounded(x, decode(frame), 1e-14)


# ------------------------------------------------------------------------------ compression


def smooth_field(n: int, dtype: str = "<f4") -> np.ndarray:
    g = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y, z = np.meshgrid(g, g, g, indexing="ij", sparse=True)
    return (np.sin(x) + np.sin(2 * y + 0.3) + np.sin(3 * z + 1.0) + np.sin(x + y + z)).astype(dtype)


def test_smooth_field_compresses_and_is_monotone_in_tol() -> None:
    x = smooth_field(64)
    value_range = float(x.max() - x.min())
    sizes = []
    for rel in (1e-4, 1e-3, 1e-2):
        frame = encode(x, rel * value_range, codec="lorenzo")
        assert read_header(frame).params["mode"] == "lorenzo"
        assert_bounded(x, decode(frame), rel * value_range)
        sizes.append(len(frame))
    assert x.nbytes / sizes[1] >= 8, sizes
    assert sizes[0] > sizes[1] > sizes[2], sizes


def test_level_is_used_and_recorded() -> None:
    x = smooth_field(32)
    tol = 1e-3
    frames = {level: encode(x, tol, codec="lorenzo", level=level) for level in (1, 19)}
    for level, frame in frames.items():
        assert read_header(frame).params["level"] == level
        assert_bounded(x, decode(frame), tol)
    assert len(frames[19]) <= len(frames[1])


def test_registry_and_config() -> None:
    assert "lorenzo" in codec_ids()
    assert get_codec("lorenzo") is LorenzoCodec
    assert LorenzoCodec.codec_id == "tierscope.lorenzo" and LorenzoCodec.lossless is False
    codec = LorenzoCodec(level=5)
    assert codec.get_config() == {"id": "tierscope.lorenzo", "level": 5}
    assert LorenzoCodec.from_config(codec.get_config()) == codec
    for bad in (True, 2.5, "3", 23, None):
        with pytest.raises(ValueError):
            LorenzoCodec(level=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not accept"):
        encode(np.zeros(3), 0.1, codec="lorenzo", step=0.1)


# ------------------------------------------------------------------------------ determinism


def _fixed_array() -> np.ndarray:
    i = np.arange(4096, dtype=np.float64).reshape(16, 16, 16)
    return ((i * 0.37) % 7.3 + i * 1e-3).astype(np.float32)  # exact IEEE ops: reproducible


def test_deterministic_bytes() -> None:
    x = _fixed_array()
    assert encode(x, 1e-3, codec="lorenzo") == encode(x.copy(), 1e-3, codec="lorenzo")


def test_decoded_values_pinned() -> None:
    """Pins quantisation + reconstruction (independent of the zstd version)."""
    x = _fixed_array()
    out = decode(encode(x, 1e-3, codec="lorenzo"))
    assert_bounded(x, out, 1e-3)
    assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == PINNED_DECODED_SHA


PINNED_DECODED_SHA = "df4d2706f5a45831"


# ------------------------------------------------------------------------------ bad payloads


def _lossy_frame() -> bytes:
    x = smooth_field(16, "<f8")
    x[1, 2, 3] = np.nan
    x[4, 5, 6] = 1e30
    frame = encode(x, 1e-3, codec="lorenzo")
    params = read_header(frame).params
    assert params["mode"] == "lorenzo" and params["n_outliers"] >= 2
    return frame


def _rebuild(frame: bytes, params: dict[str, Any] | None = None, payload: bytes | None = None,
             shape: tuple[int, ...] | None = None) -> bytes:
    header = read_header(frame)
    body = frame[header.payload_offset :] if payload is None else payload
    return pack_frame(header.codec, header.dtype, header.shape if shape is None else shape,
                      header.tol, header.params if params is None else params, body)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_corrupted_frames_only_raise_frame_errors(data: st.DataObject) -> None:
    frame = mutate_frame(data.draw(st.sampled_from([_LOSSY, _LOSSLESS])), data, max_steps=3)
    try:
        out = decode(frame)
    except FrameError:  # ChecksumError is a FrameError
        return
    assert isinstance(out, np.ndarray)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_corrupted_payload_with_valid_checksum(data: st.DataObject) -> None:
    """Mutations that reach the codec (checksum recomputed) still only raise FrameError."""
    source = data.draw(st.sampled_from([_LOSSY, _LOSSLESS]))
    header = read_header(source)
    payload = bytearray(source[header.payload_offset :])
    action = data.draw(st.sampled_from(["flip", "cut", "insert", "append"]))
    if action == "flip":
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] ^= data.draw(st.integers(1, 255))
    elif action == "cut":
        payload = payload[: data.draw(st.integers(0, len(payload) - 1))]
    elif action == "insert":
        i = data.draw(st.integers(0, len(payload)))
        payload[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        payload += data.draw(st.binary(min_size=1, max_size=64))
    try:
        out = decode(_rebuild(source, payload=bytes(payload)))
    except FrameError:
        return
    assert isinstance(out, np.ndarray) and out.shape == header.shape


def test_checksum_error_on_payload_flip() -> None:
    frame = bytearray(_LOSSY)
    frame[-5] ^= 0xFF
    with pytest.raises(ChecksumError):
        decode(bytes(frame))


@pytest.mark.parametrize(
    "change",
    [
        {"mode": "lossy"},
        {"mode": None},
        {"step": 0.0},
        {"step": -0.002},
        {"step": "0.002"},
        {"step": 2},
        {"rdtype": "<i3"},
        {"rdtype": "<i4"},
        {"rdtype": "<i8"},
        {"n_outliers": -1},
        {"n_outliers": 0},
        {"n_outliers": 10**30},
        {"n_outliers": 2.0},
        {"n_outliers": True},
        {"level": 99},
        {"level": "3"},
    ],
)
def test_tampered_params_raise_frame_error(change: dict[str, Any]) -> None:
    params = dict(read_header(_LOSSY).params)
    params.update(change)
    with pytest.raises(FrameError):
        decode(_rebuild(_LOSSY, params=params))


def test_float32_step_must_be_representable() -> None:
    x = smooth_field(16)
    frame = encode(x, 1e-3, codec="lorenzo")
    params = dict(read_header(frame).params)
    assert params["mode"] == "lorenzo"
    params["step"] = 0.1  # not a float32 value
    with pytest.raises(FrameError, match="float32"):
        decode(_rebuild(frame, params=params))


def test_wrong_shape_or_dtype_in_header() -> None:
    with pytest.raises(FrameError):
        decode(_rebuild(_LOSSY, shape=(16, 16, 15)))
    with pytest.raises(FrameError):
        decode(_rebuild(_LOSSY, shape=(16, 16, 17)))
    header = read_header(_LOSSY)
    as_int = pack_frame("lorenzo", np.dtype("<i8"), header.shape, header.tol, header.params,
                        _LOSSY[header.payload_offset :])
    with pytest.raises(FrameError):
        decode(as_int)


def test_outlier_indices_validated() -> None:
    import zstandard

    n = 10
    res = np.zeros(n, dtype="<i1").tobytes()
    params = {"level": 3, "mode": "lorenzo", "step": 0.5, "rdtype": "<i1", "n_outliers": 2}
    comp = zstandard.ZstdCompressor(write_content_size=True)
    for deltas in ([3, 0], [3, -1], [-1, 2], [9, 1], [10, 1], [2**62, 2**62]):
        body = res + np.array(deltas, "<i8").tobytes() + np.zeros(2, "<f8").tobytes()
        frame = pack_frame("lorenzo", np.dtype("<f8"), (n,), 0.25, params, comp.compress(body))
        with pytest.raises(FrameError):
            decode(frame)
    body = res + np.array([3, 4], "<i8").tobytes() + np.array([1.5, np.nan]).tobytes()
    frame = pack_frame("lorenzo", np.dtype("<f8"), (n,), 0.25, params, comp.compress(body))
    out = decode(frame)
    assert out[3] == 1.5 and np.isnan(out[7]) and np.count_nonzero(out) == 2


def test_out_of_range_codes_rejected() -> None:
    import zstandard

    res = np.array([2**62, 2**62, 0, 0], dtype="<i8")
    params = {"level": 3, "mode": "lorenzo", "step": 0.5, "rdtype": "<i8", "n_outliers": 0}
    zz = ((res << 1) ^ (res >> 63)).view("<u8")
    body = np.ascontiguousarray(zz.view(np.uint8).reshape(-1, 8).T).tobytes()
    payload = zstandard.ZstdCompressor(write_content_size=True).compress(body)
    with pytest.raises(FrameError):
        decode(pack_frame("lorenzo", np.dtype("<f8"), (4,), 0.25, params, payload))


def test_decompression_bomb_rejected() -> None:
    params = {"level": 3, "mode": "lorenzo", "step": 0.5, "rdtype": "<i8", "n_outliers": 0}
    with pytest.raises(FrameError, match="cannot decode"):
        decode(pack_frame("lorenzo", np.dtype("<f8"), (10**9,), 0.25, params, b"\x00" * 8))


_LOSSY = _lossy_frame()
_LOSSLESS = encode(np.arange(60, dtype=np.int32).reshape(3, 4, 5), 1.0, codec="lorenzo")

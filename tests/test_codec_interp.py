"""Tests of the ``interp`` and ``bounded`` codecs: the bound, exact paths, the per-block choice,
and bit-identity of the array-namespace-generic decoder (the GPU code path) with the CPU one."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.test_codec_bounded import FUZZ, assert_bounded, float_blocks, smooth_field
from tierscope.codec import codec_ids, decode, encode, get_codec, read_header
from tierscope.codec.bounded import BoundedCodec, InterpCodec
from tierscope.codec.frame import pack_frame, unpack_frame
from tierscope.codec.predictors import interp_decode, interp_encode
from tierscope.errors import FrameError

LOSSY = ["interp", "bounded"]


class GenericNumpy:
    """NumPy seen as "some other array namespace": forces the generic (CuPy) code paths."""

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def generic_decode(frame: bytes) -> np.ndarray:
    header, payload = unpack_frame(frame)
    codec = get_codec(header.codec).from_params(header.params)
    return codec.decode_device(payload, header, GenericNumpy())


def payload_nbytes(frame: bytes) -> int:
    return read_header(frame).payload_nbytes


def round_trip(x: np.ndarray, tol: float, codec: str, **params: Any) -> bytes:
    frame = encode(x, tol, codec=codec, **params)
    assert_bounded(x, decode(frame), tol)
    return frame


@FUZZ
@given(case=float_blocks(), codec=st.sampled_from(LOSSY), order=st.sampled_from([1, 3]))
def test_bound_holds_on_random_blocks(case: tuple[np.ndarray, float], codec: str, order: int) -> None:
    x, tol = case
    round_trip(x, tol, codec, order=order)


@FUZZ
@given(
    x=hnp.arrays(
        st.sampled_from([np.dtype("<f4"), np.dtype("<f8")]),
        hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6),
    ),
    tol=st.floats(min_value=0.0, max_value=1e308, allow_subnormal=True),
    codec=st.sampled_from(LOSSY),
)
def test_bound_holds_on_hypothesis_edge_values(x: np.ndarray, tol: float, codec: str) -> None:
    round_trip(x, tol, codec)


@FUZZ
@given(case=float_blocks(), codec=st.sampled_from(["lorenzo", *LOSSY]))
def test_generic_decoder_is_bit_identical_to_cpu(case: tuple[np.ndarray, float], codec: str) -> None:
    """The code that runs on CuPy, run with NumPy, equals the CPU decoder bit for bit."""
    x, tol = case
    frame = encode(x, tol, codec=codec)
    cpu = decode(frame)
    generic = generic_decode(frame)
    native = cpu.astype(cpu.dtype.newbyteorder("="))
    assert generic.dtype == native.dtype and generic.shape == native.shape
    assert generic.tobytes() == native.tobytes()


@pytest.mark.parametrize("shape", [(1,), (2,), (3,), (5,), (7, 3), (1, 5, 1, 3), (9, 17, 4), (2, 3, 4, 5)])
@pytest.mark.parametrize("order", [1, 3])
def test_interp_transform_inverts_exactly(shape: tuple[int, ...], order: int) -> None:
    rng = np.random.default_rng(1)
    y = rng.uniform(-1e4, 1e4, shape) * 16
    regular = rng.random(shape) > 0.1
    anchor, res, k = interp_encode(y, regular, 4, order, 2**40)
    assert res.size == math.prod(shape) - 1
    assert np.all(np.abs(k - y)[regular] <= 8)  # half a step of the 16x finer lattice
    for dtype in (np.int64, np.int32):
        back = interp_decode(np, res.astype(dtype), shape, anchor, 4, order)
        assert np.array_equal(back, k)
        assert np.array_equal(interp_decode(GenericNumpy(), res.astype(dtype), shape, anchor, 4, order), k)


@pytest.mark.parametrize("dtype", ["<f4", "<f8"])
def test_interp_beats_lorenzo_at_loose_bounds(dtype: str) -> None:
    x = smooth_field(48, dtype)
    x += np.random.default_rng(2).standard_normal(x.shape).astype(dtype) * 1e-3
    tol = 1e-2 * float(x.max() - x.min())
    sizes = {codec: payload_nbytes(round_trip(x, tol, codec)) for codec in ("lorenzo", "interp", "bounded")}
    assert sizes["interp"] * 3 < sizes["lorenzo"], sizes
    assert sizes["bounded"] == sizes["interp"], sizes
    assert read_header(encode(x, tol, codec="bounded")).params["mode"] == "interp"


def test_bounded_keeps_lorenzo_when_smaller() -> None:
    """Per-block choice: a block where Lorenzo wins is stored as a lorenzo-mode frame."""
    rng = np.random.default_rng(0)  # constant along x, random steps across: Lorenzo's case
    x = np.repeat(rng.integers(0, 5, (16, 16, 1)), 16, axis=2).astype(np.float64)
    candidates = {codec: payload_nbytes(round_trip(x, 1e-3, codec)) for codec in ("lorenzo", "interp")}
    frame = round_trip(x, 1e-3, "bounded")
    assert read_header(frame).params["mode"] == "lorenzo", candidates
    assert payload_nbytes(frame) == candidates["lorenzo"] < candidates["interp"]


@pytest.mark.parametrize("codec", LOSSY)
def test_exact_paths(codec: str) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 7, 3)).astype("<f4")
    x.reshape(-1)[:3] = [np.nan, np.inf, -0.0]
    frame = encode(x, 0.0, codec=codec)
    assert read_header(frame).params["mode"] == "lossless"
    assert decode(frame).tobytes() == x.tobytes()
    ints = np.arange(60, dtype=">i4").reshape(3, 4, 5)
    assert decode(encode(ints, 5.0, codec=codec)).tobytes() == ints.tobytes()


def test_non_finite_and_spikes_exact() -> None:
    x = smooth_field(16).astype(np.float32)
    bits = x.reshape(-1).view(np.uint32)
    bits[[3, 50, 99]] = [0x7FC01234, 0xFFBFFFFF, 0x7F800001]
    x[2, 3, 4], x[5, 5, 5], x[0, 0, 0] = np.inf, -np.inf, 3e38
    for codec in LOSSY:
        frame = round_trip(x, 1e-3, codec)
        out = decode(frame).reshape(-1).view(np.uint32)
        assert out[[3, 50, 99]].tolist() == [0x7FC01234, 0xFFBFFFFF, 0x7F800001]
        assert read_header(frame).params["n_outliers"] >= 6


def test_registry_and_config() -> None:
    assert {"lorenzo", "interp", "bounded"} <= set(codec_ids())
    assert get_codec("interp") is InterpCodec and get_codec("bounded") is BoundedCodec
    assert InterpCodec(order=1).get_config() == {"id": "tierscope.interp", "level": 3, "order": 1}
    assert BoundedCodec.from_config(BoundedCodec(level=5).get_config()) == BoundedCodec(level=5)
    for bad in (2, 0, True, "3"):
        with pytest.raises(ValueError, match="order"):
            InterpCodec(order=bad)  # type: ignore[arg-type]


def _interp_frame() -> bytes:
    x = smooth_field(16, "<f8")
    x[1, 2, 3] = np.nan
    frame = encode(x, 1e-3, codec="interp")
    assert read_header(frame).params["mode"] == "interp"
    return frame


@pytest.mark.parametrize(
    "change",
    [{"mode": "lorenzo"}, {"frac_bits": 9}, {"frac_bits": -1}, {"order": 2}, {"anchor": 2**60},
     {"anchor": 1.5}, {"shuffle": "nibble"}, {"rdtype": "<i8"}, {"n_outliers": 0}, {"step": 0.0}],
)
def test_tampered_interp_params_raise_frame_error(change: dict[str, Any]) -> None:
    frame = _interp_frame()
    header = read_header(frame)
    params = {**header.params, **change}
    tampered = pack_frame("interp", header.dtype, header.shape, header.tol, params,
                          frame[header.payload_offset :])
    with pytest.raises(FrameError):
        decode(tampered)


def test_device_gpu_without_cupy_is_a_clear_error() -> None:
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="CuPy"):
            decode(_interp_frame(), device="gpu")

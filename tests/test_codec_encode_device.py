"""The array-namespace-generic encoder (the GPU encode path) gives the CPU encoder's frame byte for byte.

NumPy poses as a foreign namespace that records which functions the encoder asks it for; those must be
functions CuPy has too. Real-GPU comparisons are in tests/test_codec_gpu.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.test_codec_bounded import FUZZ, float_blocks, smooth_field
from tierscope.codec import decode, encode, get_codec
from tierscope.codec.device import gpu_available, resolve_device
from tierscope.codec.frame import pack_frame

BOUNDED = ["lorenzo", "interp", "bounded"]
# namespace functions the encoder may use: all exist in CuPy 13 with the same semantics
CUPY_API = frozenset({
    "abs", "asarray", "ascontiguousarray", "clip", "concatenate", "cumsum", "empty", "empty_like",
    "flatnonzero", "isfinite", "maximum", "packbits", "rint", "subtract", "unpackbits", "where", "zeros",
    "zeros_like",
})
needs_no_gpu = pytest.mark.skipif(gpu_available(), reason="checks the error raised without a GPU")


class RecordingNumpy:
    """NumPy seen as "some other array namespace" that notes every function asked of it."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        self.used.add(name)
        return getattr(np, name)


def generic_encode(x: np.ndarray, tol: float, codec: str, **params: Any) -> bytes:
    """A frame from the codec's ``encode_device`` run with the foreign namespace, as ``encode`` packs it."""
    xp = RecordingNumpy()
    codec_cls = get_codec(codec)
    payload, stored = codec_cls.from_kwargs(params).encode_device(x, tol, xp)
    unknown = xp.used - CUPY_API - {"asnumpy"}
    assert not unknown, f"encoder uses namespace functions not checked against CuPy: {unknown}"
    return pack_frame(codec_cls.name, x.dtype, x.shape, tol, stored, payload)


@FUZZ
@given(case=float_blocks(), codec=st.sampled_from(BOUNDED), order=st.sampled_from([1, 3]))
def test_generic_encode_is_byte_identical(case: tuple[np.ndarray, float], codec: str, order: int) -> None:
    x, tol = case
    params = {} if codec == "lorenzo" else {"order": order}
    assert generic_encode(x, tol, codec, **params) == encode(x, tol, codec=codec, **params)


def _cases() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    smooth = smooth_field(24)
    spiky = smooth.copy()
    flat = spiky.reshape(-1)
    flat[rng.integers(0, flat.size, 200)] = np.nan
    flat[:4] = [np.inf, -np.inf, 3e38, -3e38]
    flat[rng.integers(0, flat.size, 50)] *= 1e6
    nan_payload = np.array([1.0, 2.0, 3.0, 4.0] * 5, dtype="<f8")
    nan_payload.view(np.uint64)[3] = 0x7FF0000000000ABC
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    return [
        ("smooth 3-d f32", smooth),
        ("spiky f32", spiky),
        ("big-endian f8 4-d", (rng.standard_normal((3, 9, 5, 4)) * 1e3).astype(">f8")),
        ("1-d f8 with NaN payload", nan_payload),
        ("denormals f32", (rng.integers(-1000, 1000, (17, 13)) * tiny).astype("<f4")),
        ("constant 2-d", np.full((9, 31), 2.5, dtype="<f4")),
        ("all NaN", np.full((5, 5), np.nan, dtype="<f8")),
        ("outlier at the origin", np.concatenate([[np.inf], np.linspace(0, 1, 99)]).astype("<f4")),
    ]


@pytest.mark.parametrize("codec", BOUNDED)
@pytest.mark.parametrize("rel", [0.0, 1e-6, 1e-3, 1e-1, 10.0])
def test_generic_encode_fixed_cases(codec: str, rel: float) -> None:
    for name, x in _cases():
        finite = x[np.isfinite(x)].astype(np.float64)
        tol = rel * (float(finite.max() - finite.min()) if finite.size else 1.0) or rel
        frame = generic_encode(x, tol, codec)
        assert frame == encode(x, tol, codec=codec), name
        assert decode(frame).tobytes() == decode(encode(x, tol, codec=codec)).tobytes()


@pytest.mark.parametrize("codec", ["zstd", "raw", "fp16"])
def test_codecs_without_device_stages_encode_on_the_host(codec: str) -> None:
    x = smooth_field(12)
    assert generic_encode(x, 1e-3, codec) == encode(x, 1e-3, codec=codec)


def test_unknown_device_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown device 'tpu'; expected one of cpu, gpu"):
        encode(np.zeros(4), 0.1, codec="lorenzo", device="tpu")


@needs_no_gpu
def test_gpu_encode_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="device='gpu' needs (CuPy|a CUDA GPU)"):
        encode(smooth_field(8), 0.1, codec="lorenzo", device="gpu")


@needs_no_gpu
def test_resolve_device_without_a_gpu() -> None:
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(RuntimeError, match="device='gpu' needs"):
        resolve_device("gpu")


def test_resolve_device_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="encode_device must be one of auto, cpu, gpu, got 'fast'"):
        resolve_device("fast", "encode_device")

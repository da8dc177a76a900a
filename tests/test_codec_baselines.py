"""Tests of the baseline codecs (fp16, zfp, sz3) and of the missing-package registry path."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_codec_bounded import smooth_field
from tierscope.codec import codec_ids, decode, encode, get_codec, read_header
from tierscope.codec import registry as registry_mod
from tierscope.errors import FrameError

BOUNDED_LIBS = [name for name in ("zfp", "sz3") if name in codec_ids()]


def test_fp16_cast_error_is_what_a_cast_gives() -> None:
    x = smooth_field(16)
    out = decode(encode(x, 1e-3, codec="fp16"))
    assert out.dtype == x.dtype and np.array_equal(out, x.astype(np.float16).astype(np.float32))
    assert read_header(encode(np.arange(5), 1.0, codec="fp16")).params == {"mode": "lossless"}
    assert len(encode(x, 0.1, codec="fp16")) < x.nbytes // 2 + 300


def test_fp16_records_its_real_error_and_never_claims_tol_0() -> None:
    x = smooth_field(16) * 4
    frame = encode(x, 1e-3, codec="fp16")
    real = float(np.abs(decode(frame) - x).max())
    assert read_header(frame).params["max_error"] == real > 1e-3  # unbounded, and says so
    lossless = encode(x, 0.0, codec="fp16")
    assert read_header(lossless).params == {"mode": "lossless"} and np.array_equal(decode(lossless), x)


@pytest.mark.parametrize("codec", BOUNDED_LIBS)
@pytest.mark.parametrize("dtype", ["<f4", ">f8"])
@pytest.mark.parametrize("shape", [(7,), (12, 9), (16, 16, 16), (2, 5, 6, 7), (2, 2, 3, 4, 5)])
def test_library_bound_on_finite_fields(codec: str, dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    x = (np.cumsum(rng.standard_normal(shape), axis=-1) * 10).astype(dtype)
    for tol in (1e-4, 1e-2, 1.0):
        frame = encode(x, tol, codec=codec)
        assert read_header(frame).params == {"mode": codec}
        out = decode(frame)
        assert out.dtype.str == x.dtype.str and out.shape == x.shape
        assert float(np.abs(out.astype(np.float64) - x.astype(np.float64)).max()) <= tol


@pytest.mark.parametrize("codec", ["fp16", *BOUNDED_LIBS])
def test_fallbacks_are_lossless(codec: str) -> None:
    for x, tol in ((np.zeros((0, 3), np.float32), 0.1), (np.arange(12, dtype=">i2"), 0.5),
                   (smooth_field(8), 0.0)):
        frame = encode(x, tol, codec=codec)
        assert read_header(frame).params == {"mode": "lossless"}
        assert decode(frame).tobytes() == x.tobytes()


@pytest.mark.parametrize("codec", BOUNDED_LIBS)
def test_corrupt_library_payload_is_a_frame_error(codec: str) -> None:
    from tierscope.codec.frame import pack_frame

    frame = encode(smooth_field(16), 1e-3, codec=codec)
    header = read_header(frame)
    with pytest.raises(FrameError):
        decode(pack_frame(codec, header.dtype, header.shape, header.tol, header.params, b"\x00" * 7))
    with pytest.raises(FrameError, match="mode"):
        decode(pack_frame(codec, header.dtype, header.shape, header.tol, {"mode": "x"}, b""))


def test_missing_package_named_in_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry_mod._MISSING, "mgard-test", "x")
    registry_mod.register_missing("mgard-test", "pymgard", "No module named 'pymgard'")
    assert "mgard-test" not in codec_ids()
    with pytest.raises(ValueError, match="needs the package 'pymgard'"):
        get_codec("mgard-test")

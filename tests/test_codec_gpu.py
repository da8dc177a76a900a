"""GPU decode and encode (CuPy) must equal the CPU ones bit for bit; skipped cleanly without a GPU.

Throughput is measured by ``tierscope bench codec`` / benchmarks, not here.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_codec_bounded import smooth_field
from tierscope.bench.codec import turbulence
from tierscope.codec import decode, encode

cupy = pytest.importorskip("cupy")
try:
    _DEVICES = cupy.cuda.runtime.getDeviceCount()
except Exception:  # CUDA errors have driver-specific types
    _DEVICES = 0
pytestmark = pytest.mark.skipif(_DEVICES < 1, reason="no CUDA GPU")


def _fields() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    smooth = smooth_field(40)
    spiky = smooth.copy()
    spiky.reshape(-1)[rng.integers(0, spiky.size, 50)] = np.nan
    spiky[0, 0, :3] = [np.inf, -np.inf, 3e38]
    return [smooth, smooth.astype(">f8"), spiky, rng.standard_normal((3, 17, 9, 5)).astype("<f4")]


@pytest.mark.parametrize("codec", ["lorenzo", "interp", "bounded", "zstd", "raw"])
@pytest.mark.parametrize("rel", [0.0, 1e-5, 1e-3, 1e-1])
def test_gpu_decode_bit_identical(codec: str, rel: float) -> None:
    for x in _fields():
        finite = x[np.isfinite(x)].astype(np.float64)
        frame = encode(x, rel * float(finite.max() - finite.min()), codec=codec)
        cpu = decode(frame)
        gpu = decode(frame, device="gpu")
        assert isinstance(gpu, cupy.ndarray) and gpu.flags.c_contiguous
        assert gpu.dtype == cpu.dtype.newbyteorder("=") and gpu.shape == cpu.shape
        assert cupy.asnumpy(gpu).tobytes() == cpu.astype(gpu.dtype).tobytes()


@pytest.mark.parametrize("codec", ["lorenzo", "interp", "bounded", "zstd"])
@pytest.mark.parametrize("rel", [0.0, 1e-5, 1e-3, 1e-1])
def test_gpu_encode_byte_identical(codec: str, rel: float) -> None:
    for x in _fields():
        finite = x[np.isfinite(x)].astype(np.float64)
        tol = rel * float(finite.max() - finite.min())
        cpu = encode(x, tol, codec=codec)
        assert encode(x, tol, codec=codec, device="gpu") == cpu
        native = x.astype(x.dtype.newbyteorder("="))
        on_device = encode(cupy.asarray(native), tol, codec=codec, device="gpu")
        assert on_device == encode(native, tol, codec=codec)


def test_gpu_encode_byte_identical_on_a_large_turbulent_block() -> None:
    x = turbulence(96, seed=3)
    for codec in ("lorenzo", "interp", "bounded"):
        for rel in (1e-3, 1e-2):
            tol = rel * float(x.max() - x.min())
            frame = encode(cupy.asarray(x), tol, codec=codec, device="gpu")
            assert frame == encode(x, tol, codec=codec)
            assert cupy.asnumpy(decode(frame, device="gpu")).tobytes() == decode(frame).tobytes()

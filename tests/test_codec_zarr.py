"""tierscope frames inside a zarr v3 array (and through numcodecs): written, reopened, within tol."""

from __future__ import annotations

from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr

from tests.test_codec_bounded import smooth_field
from tierscope.codec import read_header
from tierscope.codec.zarr3 import TierscopeNumcodec, TierscopeZarrCodec


@pytest.mark.parametrize("codec", ["bounded", "lorenzo", "zstd"])
def test_zarr_v3_array_round_trip_within_tol(tmp_path: Path, codec: str) -> None:
    x = smooth_field(32)[:30]  # partial edge chunks too
    tol = 1e-3
    path = tmp_path / "a.zarr"
    z = zarr.create_array(str(path), shape=x.shape, chunks=(16, 16, 16), dtype="float32",
                          serializer=TierscopeZarrCodec(codec=codec, tol=tol), compressors=None)
    z[...] = x
    back = zarr.open_array(str(path), mode="r")
    assert isinstance(back.metadata.codecs[0], TierscopeZarrCodec)
    assert back.metadata.codecs[0].to_dict() == {"name": "tierscope",
                                                 "configuration": {"codec": codec, "tol": tol}}
    out = back[...]
    assert out.dtype == x.dtype and out.shape == x.shape
    assert float(np.abs(out.astype(np.float64) - x).max()) <= tol
    chunk = (path / "c" / "0" / "0" / "0").read_bytes()  # each chunk is one tierscope frame
    header = read_header(chunk)
    assert header.codec == codec and header.tol == tol and header.shape == (16, 16, 16)
    assert len(chunk) < 16**3 * 4


def test_zarr_codec_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        TierscopeZarrCodec(codec="nope")
    with pytest.raises(ValueError, match="tol"):
        TierscopeZarrCodec(tol=-1.0)
    assert TierscopeZarrCodec.from_dict({"name": "tierscope"}) == TierscopeZarrCodec()


def test_numcodecs_codec() -> None:
    x = smooth_field(16, "<f8")
    codec = numcodecs.get_codec({"id": "tierscope", "codec": "interp", "tol": 1e-4})
    assert isinstance(codec, TierscopeNumcodec)
    assert codec.get_config() == {"id": "tierscope", "codec": "interp", "tol": 1e-4}
    frame = codec.encode(x)
    out = codec.decode(frame)
    assert float(np.abs(out - x).max()) <= 1e-4
    target = np.empty_like(x)
    assert codec.decode(frame, out=target) is target and np.array_equal(target, out)
    with pytest.raises(ValueError, match="bytes"):
        codec.decode(frame, out=np.empty(3))
    strided = np.empty((2 * x.shape[0], *x.shape[1:]))[::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        codec.decode(frame, out=strided)
